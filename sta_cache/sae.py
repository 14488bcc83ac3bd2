"""Top-K sparse autoencoder: the dictionary of "semantic atoms" for one kind of cached vector."""

from __future__ import annotations

import torch
from torch import nn

from .configs import Encoder, check_choice
from .kernels.reference import omp_encode_reference, topk_encode_reference


class TopKSAE(nn.Module):
    """A Top-K sparse autoencoder for vectors of size ``d`` with ``n_atoms`` atoms (Gao et al. 2024).

    ``encode`` keeps the ``k`` largest pre-activations and applies ReLU after the Top-K, so the kept
    coefficients are not shrunk the way an L1 penalty would shrink them. ``decode`` is
    ``b_dec + sum_j c_j W_dec[i_j]`` with unit-norm decoder rows (the atoms).

    ``encoder="omp"`` chooses codes by orthogonal matching pursuit over ``W_dec`` instead of the one-shot
    encoder: same storage, signed coefficients, much better reconstructions (see the README's lab notes).
    """

    def __init__(self, d: int, n_atoms: int, *, encoder: Encoder = "topk", dtype: torch.dtype = torch.float32):
        super().__init__()
        check_choice("encoder", encoder, Encoder)
        self.d, self.n_atoms, self.encoder = d, n_atoms, encoder
        if encoder == "omp":  # matching pursuit reads only the decoder: no encoder weights are held
            self.register_parameter("W_enc", None)
            self.register_parameter("b_enc", None)
        else:
            self.W_enc = nn.Parameter(torch.empty(d, n_atoms, dtype=dtype))
            self.b_enc = nn.Parameter(torch.zeros(n_atoms, dtype=dtype))
        self.W_dec = nn.Parameter(torch.empty(n_atoms, d, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random unit-norm atoms; the encoder starts as the decoder's transpose (a standard SAE init)."""
        with torch.no_grad():
            nn.init.normal_(self.W_dec)
            self.normalize_decoder()
            self.b_dec.zero_()
            if self.W_enc is not None:
                self.W_enc.copy_(self.W_dec.T)
                self.b_enc.zero_()

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Project the atoms back onto the unit sphere."""
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    def encode(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Code ``x [..., d]`` as ``(indices [..., k] int64, coefficients [..., k])`` with this SAE's encoder."""
        self._check_k(k)
        if not torch.isfinite(x).all():
            raise ValueError("TopKSAE.encode got non-finite values (NaN or inf); refusing to code them")
        flat = x.reshape(-1, self.d).to(self.W_dec.dtype)
        if self.encoder == "omp":
            idx, coef = omp_encode_reference(flat, self.W_dec, self.b_dec, k)
        else:
            idx, coef = topk_encode_reference(flat, self.W_enc, self.b_enc, self.b_dec, k)
        return idx.reshape(*x.shape[:-1], k), coef.reshape(*x.shape[:-1], k)

    def decode(self, indices: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
        """Rebuild ``x_hat [..., d]`` from codes; differentiable in the coefficients and in ``W_dec``."""
        atoms = self.W_dec[indices.long()]  # [..., k, d]
        return torch.einsum("...k,...kd->...d", coefficients.to(atoms.dtype), atoms) + self.b_dec

    def forward(self, x: torch.Tensor, k: int) -> torch.Tensor:
        return self.decode(*self.encode(x, k))

    def _check_k(self, k: int) -> None:
        if not 1 <= k <= self.n_atoms:
            raise ValueError(f"k must be between 1 and the number of atoms ({self.n_atoms}), got k={k}")
