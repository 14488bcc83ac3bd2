"""Measuring dictionaries and caches: ``sta-cache eval`` and ``sta-cache analyze``, and their building blocks.

* ``eval`` (:func:`run_eval`, :mod:`.run`): perplexity (:mod:`.perplexity`), passkey retrieval (:mod:`.passkey`)
  and stored bytes (:mod:`.bytes`) for each cache configuration (:mod:`.specs`) -> :mod:`.report` and a Pareto
  figure (:mod:`.figures`).
* ``analyze`` (:func:`run_analysis`, :mod:`.analysis`): reconstruction against k and its elbow (:mod:`.elbow`),
  key-value asymmetry across depth, semantic atoms (:mod:`.atoms`) -> :mod:`.analysis_report` and figures.

Both start from :func:`.inputs.prepare`; their settings are :class:`~sta_cache.configs.EvalConfig` and
:class:`~sta_cache.configs.AnalyzeConfig`.
"""

from __future__ import annotations

from ..configs import AnalyzeConfig, EvalConfig
from .analysis import reconstruction_stats, run_analysis
from .atoms import atom_usage, usage_summary
from .bytes import cache_bytes
from .elbow import depth_groups, elbow_chord, elbow_gain, suggest_budget
from .passkey import PasskeyPrompt, feed, greedy_answer, passkey_correct, passkey_prompt
from .perplexity import PerplexityResult, perplexity
from .run import run_eval

__all__ = [
    "AnalyzeConfig",
    "EvalConfig",
    "PasskeyPrompt",
    "PerplexityResult",
    "atom_usage",
    "cache_bytes",
    "depth_groups",
    "elbow_chord",
    "elbow_gain",
    "feed",
    "greedy_answer",
    "passkey_correct",
    "passkey_prompt",
    "perplexity",
    "reconstruction_stats",
    "run_analysis",
    "run_eval",
    "suggest_budget",
    "usage_summary",
]
