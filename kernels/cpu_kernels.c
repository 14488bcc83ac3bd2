/* CPU kernels of the cache (see cpu_kernels.py, which builds and loads this file): decode-into-attention over Top-K
 * codes (sta_attention, reproducing reference.py's sparse_attention_reference in one call), OMP
 * encode-on-append (reproducing omp_encode_reference) and the codes of rotated values (sta_rotated_encode,
 * reproducing rotated_values.py's PyTorch path).
 *
 * Each kernel streams the codes once, a block of tokens at a time: indices (uint8 / int16 / int32 / int64, or
 * bit-packed) and coefficients (float32 / float16 / bfloat16, or one-byte floats through a 256-entry table) are
 * widened into small buffers that stay in L1, and every query row sharing a KV head is served from that block.
 * Nothing of size [tokens, k, d] is ever materialised, which is what the PyTorch path cannot avoid.
 *
 * Work is split with OpenMP over (batch x KV head, token block) and query rows; the value pass gives each thread
 * its own atom-space accumulator and sums them at the end, so no two threads write the same memory.
 */
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

enum { INDEX_U8 = 0, INDEX_I16 = 1, INDEX_I32 = 2, INDEX_I64 = 3, INDEX_PACKED = 4, INDEX_IMPLICIT = 5 };
enum { COEF_F32 = 0, COEF_F16 = 1, COEF_BF16 = 2, COEF_TABLE8 = 3, COEF_LEVELS = 4 };

/* One kind's codes, [BH, tokens, k] (indices: [BH, tokens, packed_row] when packed, none for INDEX_IMPLICIT, where
 * slot j is atom j; coefficients: [BH, tokens, level_row] for COEF_LEVELS), C-contiguous. */
typedef struct {
    const void *indices;
    const void *coefficients;
    const float *table8; /* the 256 values of a one-byte float format: COEF_TABLE8's coefficients, COEF_LEVELS' scale */
    const float *level_values; /* COEF_LEVELS only: the value of each of the 2^level_bits level codes */
    int64_t tokens;
    int32_t k;
    int32_t index_kind;
    int32_t index_bits; /* INDEX_PACKED only */
    int32_t packed_row; /* bytes per token, INDEX_PACKED only */
    int32_t coefficient_kind;
    int32_t level_bits; /* COEF_LEVELS only */
    int32_t level_row;  /* bytes per token, COEF_LEVELS only */
} codes_t;

/* Block of tokens decoded at a time: BLOCK_CODES indices + coefficients (32 KiB) stay in L1. */
#define BLOCK_CODES 4096
#define MAX_HEAD_DIM 1024

static inline int64_t block_tokens(int32_t k) { return k >= BLOCK_CODES ? 1 : BLOCK_CODES / k; }

static inline float bits_to_float(uint32_t bits) {
    float out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
    if (exponent == 0) { /* zero or subnormal: mantissa * 2^-24 */
        float magnitude = (float)mantissa * (1.0f / 16777216.0f);
        return (h & 0x8000u) ? -magnitude : magnitude;
    }
    if (exponent == 31) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
    return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

/* Tokens [t0, t0 + n) of slab bh -> idx[n * k], coef[n * k]. */
static void load_block(const codes_t *c, int64_t bh, int64_t t0, int64_t n, int32_t *idx, float *coef) {
    const int64_t k = c->k, first = bh * c->tokens + t0, count = n * k;
    switch (c->index_kind) {
    case INDEX_U8: { const uint8_t *p = (const uint8_t *)c->indices + first * k;
        for (int64_t i = 0; i < count; i++) idx[i] = p[i];
        break; }
    case INDEX_I16: { const int16_t *p = (const int16_t *)c->indices + first * k;
        for (int64_t i = 0; i < count; i++) idx[i] = p[i];
        break; }
    case INDEX_I32: { const int32_t *p = (const int32_t *)c->indices + first * k;
        memcpy(idx, p, (size_t)count * sizeof *idx);
        break; }
    case INDEX_I64: { const int64_t *p = (const int64_t *)c->indices + first * k;
        for (int64_t i = 0; i < count; i++) idx[i] = (int32_t)p[i];
        break; }
    case INDEX_IMPLICIT: /* slot j is atom j: the caller (accumulate_dense) reads no indices */
        break;
    default: { /* little-endian bit stream per token, index j at bit j * bits (packing.py) */
        const int64_t row = c->packed_row;
        const uint32_t bits = (uint32_t)c->index_bits, mask = (1u << bits) - 1u;
        const uint8_t *p = (const uint8_t *)c->indices + first * row;
        /* An index spans at most 3 bytes (bits <= 16); one 4-byte load may run up to 3 bytes past its token's
         * row, into the next rows, which exist for all but the block's last 3 tokens: those read byte by byte. */
        const int64_t unchecked = n > 3 ? n - 3 : 0;
        for (int64_t t = 0; t < unchecked; t++, p += row) {
            for (int64_t j = 0; j < k; j++) {
                const int64_t bit = j * bits;
                uint32_t word;
                memcpy(&word, p + (bit >> 3), sizeof word);
                idx[t * k + j] = (int32_t)((word >> (bit & 7)) & mask);
            }
        }
        for (int64_t t = unchecked; t < n; t++, p += row) {
            for (int64_t j = 0; j < k; j++) {
                const int64_t bit = j * bits, byte = bit >> 3;
                uint32_t word = p[byte];
                if (byte + 1 < row) word |= (uint32_t)p[byte + 1] << 8;
                if (byte + 2 < row) word |= (uint32_t)p[byte + 2] << 16;
                idx[t * k + j] = (int32_t)((word >> (bit & 7)) & mask);
            }
        }
    } }
    switch (c->coefficient_kind) {
    case COEF_F32:
        memcpy(coef, (const float *)c->coefficients + first * k, (size_t)count * sizeof *coef);
        break;
    case COEF_F16: { const uint16_t *p = (const uint16_t *)c->coefficients + first * k;
        for (int64_t i = 0; i < count; i++) coef[i] = half_to_float(p[i]);
        break; }
    case COEF_BF16: { const uint16_t *p = (const uint16_t *)c->coefficients + first * k;
        for (int64_t i = 0; i < count; i++) coef[i] = bits_to_float((uint32_t)p[i] << 16);
        break; }
    case COEF_TABLE8: { const uint8_t *p = (const uint8_t *)c->coefficients + first * k;
        for (int64_t i = 0; i < count; i++) coef[i] = c->table8[p[i]];
        break; }
    default: { /* per token: a one-byte float scale, then k level codes of level_bits bits from bit 0 of the next
                * byte (packing.py, pack_level_rows); a code spans at most 2 bytes */
        const int64_t row = c->level_row;
        const uint32_t bits = (uint32_t)c->level_bits, mask = (1u << bits) - 1u;
        const float *values = c->level_values;
        const uint8_t *p = (const uint8_t *)c->coefficients + first * row, *end = p + n * row;
        const int64_t groups = k / 8; /* 8 codes fill `bits` whole bytes: one 8-byte load holds them */
        for (int64_t t = 0; t < n; t++, p += row) {
            const float scale = c->table8[p[0]];
            float *out = coef + t * k;
            int64_t j = 0;
            /* the last group's load runs up to 8 - bits bytes past the codes, into the following rows, which
             * exist for all but the block's last tokens: those take the byte-wise loop below */
            if (groups && p + 1 + (groups - 1) * bits + 8 <= end) {
                for (int64_t g = 0; g < groups; g++, j += 8) {
                    uint64_t word;
                    memcpy(&word, p + 1 + g * bits, sizeof word);
                    for (uint32_t i = 0; i < 8; i++) out[j + i] = values[(word >> (i * bits)) & mask] * scale;
                }
            }
            for (; j < k; j++) {
                const int64_t bit = j * bits, byte = 1 + (bit >> 3);
                uint32_t word = p[byte];
                if (byte + 1 < row) word |= (uint32_t)p[byte + 1] << 8;
                out[j] = values[(word >> (bit & 7)) & mask] * scale;
            }
        }
    } }
}

/* ------------------------------------------------------------------------------------- decode-into-attention */

/* Everything attention reads of one layer besides its codes (cpu_kernels.py fills it from a CompressedKV). Dense
 * tensors are float32 and C-contiguous; a slab is one (batch, KV head), BH = batch * heads of them, each with
 * `rows` query rows: row r of a slab is query r % query_len of query head r / query_len of its group. */
typedef struct {
    const float *queries;                     /* [BH, rows, d] */
    const float *sink_keys, *sink_values;     /* [BH, sinks, d] */
    const float *window_keys, *window_values; /* [BH, window, d] */
    const uint8_t *mask;                      /* [batch, query_len, length], nonzero = may attend; NULL: all may */
    const float *key_atoms, *key_bias;        /* [Hd, N, d], [Hd, d]; Hd (dictionaries) 1 or heads */
    const float *value_atoms, *value_bias;
    const float *atom_scores;                 /* post-RoPE key codes: q . D^T, [BH, rows, N]; NULL: pre-RoPE */
    const int32_t *positions;                 /* pre-RoPE key codes: [batch, C], rows of the cos/sin tables */
    const float *cos_table, *sin_table;       /* [positions, d / 2] */
    float rope_scaling, scaling, softcap;     /* softcap 0: none */
    int64_t batch, heads, rows, query_len, dim, sinks, window;
    int64_t key_dictionaries, key_n_atoms, value_dictionaries, value_n_atoms;
} attention_t;

/* Eight floats (or ints) as one value: GCC/Clang vector extensions, lowered to what the target has (AVX: one
 * register). */
typedef float vec8 __attribute__((vector_size(32)));
typedef int32_t ivec8 __attribute__((vector_size(32)));
#define MAX_VECTORS (MAX_HEAD_DIM / 8)

static inline vec8 load8(const float *p) {
    vec8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store8(float *p, vec8 v) { memcpy(p, &v, sizeof v); }

static inline float sum8(vec8 v) {
    float s = 0.0f;
    for (int lane = 0; lane < 8; lane++) s += v[lane];
    return s;
}

/* e^x in eight lanes (Cephes' expf: Cody-Waite reduction by ln 2, a degree-6 polynomial, the power of two put in
 * the exponent bits; ~1 ulp), 0 below -87 (e^-87 is near float's smallest normal), which includes -inf: masked
 * slots. The softmax spends most of its time here, and a scalar expf call per slot cost more than all the rest of
 * a long context's attention. */
static inline vec8 exp8(vec8 x) {
    const ivec8 live = x >= -87.0f, high = x > 88.0f;
    x = (vec8)(((ivec8)x & live) | ((ivec8)((vec8){0} - 87.0f) & ~live));
    x = (vec8)(((ivec8)x & ~high) | ((ivec8)((vec8){0} + 88.0f) & high));
    const vec8 magic = (vec8){0} + 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    const vec8 n = (x * 1.44269504088896341f + magic) - magic;
    const vec8 r = x - n * 0.693359375f - n * -2.12194440e-4f;
    vec8 p = (vec8){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const ivec8 power = (__builtin_convertvector(n, ivec8) + 127) << 23;
    return (vec8)(((ivec8)(p * (vec8)power)) & live);
}

/* Sixteen floats (or ints) as one value: one AVX-512 register, two AVX ones. */
typedef float vec16 __attribute__((vector_size(64)));
typedef int32_t ivec16 __attribute__((vector_size(64)));

/* sum of x[e] * y[e] over dim (a multiple of 16) in 16-float vectors, summed by a shuffle tree */
static inline float dot16(const float *x, const float *y, int64_t dim) {
    vec16 acc = {0};
    for (int64_t e = 0; e < dim; e += 16) {
        vec16 a, b;
        memcpy(&a, x + e, sizeof a);
        memcpy(&b, y + e, sizeof b);
        acc += a * b;
    }
#ifdef __AVX512F__
    __m512 total;
    memcpy(&total, &acc, sizeof total);
    return _mm512_reduce_add_ps(total);
#else
    float sum = 0.0f;
    for (int i = 0; i < 16; i++) sum += acc[i];
    return sum;
#endif
}

/* out += w * x over `dim` floats, dim a multiple of 8. */
static inline void axpy8(float *out, float w, const float *x, int64_t dim) {
    const vec8 wv = (vec8){0} + w;
    for (int64_t i = 0; i < dim; i += 8) store8(out + i, load8(out + i) + wv * load8(x + i));
}

/* Post-RoPE key codes: score[r, t] = q_r . bias + sum_j coef[t, j] * atom_scores[r, idx[t, j]] for every row of
 * every slab, written at column `sinks` of each score row (`length` floats apart). */
static void key_scores_post(const codes_t *codes, const attention_t *a, float *scores, int64_t length, int threads) {
    const int64_t tokens = codes->tokens, k = codes->k, per_block = block_tokens(codes->k);
    const int64_t blocks = (tokens + per_block - 1) / per_block, slabs = a->batch * a->heads, dim = a->dim;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t item = 0; item < slabs * blocks; item++) {
        int32_t idx[BLOCK_CODES];
        float coef[BLOCK_CODES];
        const int64_t bh = item / blocks, t0 = (item % blocks) * per_block;
        const int64_t n = tokens - t0 < per_block ? tokens - t0 : per_block;
        const int64_t dictionary = a->key_dictionaries == 1 ? 0 : bh % a->heads;
        load_block(codes, bh, t0, n, idx, coef);
        for (int64_t r = 0; r < a->rows; r++) {
            const int64_t row = bh * a->rows + r;
            const float *table = a->atom_scores + row * a->key_n_atoms;
            const float bias = dot16(a->queries + row * dim, a->key_bias + dictionary * dim, dim);
            float *score = scores + row * length + a->sinks + t0;
            for (int64_t t = 0; t < n; t++) {
                const int32_t *ti = idx + t * k;
                const float *tc = coef + t * k;
                float s = 0.0f;
                for (int64_t j = 0; j < k; j++) s += tc[j] * table[ti[j]];
                score[t] = bias + s;
            }
        }
    }
}

/* Pre-RoPE keys, one block of tokens of one slab: rebuild key = bias + sum_j coef_j atom_j, rotate it to its
 * position (rotate-half convention; cos/sin rows [d/2] per position), scale, and dot it with every query row of
 * the slab into out[r * stride + t]. Eight lanes at a time, head_dim a multiple of 16; inlined with DIM a
 * compile-time constant for the common head sizes (0: any multiple of 16), so that the key stays in registers. */
static inline __attribute__((always_inline)) void pre_rope_block(
    const int32_t *idx, const float *coef, int64_t n, int64_t k, const float *atoms, const float *bias,
    const int32_t *positions, const float *cos_table, const float *sin_table, float rope_scaling,
    const float *queries, int64_t rows, int64_t stride, float *out, const int64_t DIM, int64_t dim_any) {
    const int64_t dim = DIM ? DIM : dim_any, vectors = dim / 8, half = vectors / 2;
    for (int64_t t = 0; t < n; t++) {
        vec8 key[MAX_VECTORS], rotated[MAX_VECTORS];
        for (int64_t v = 0; v < vectors; v++) key[v] = load8(bias + 8 * v);
        for (int64_t j = 0; j < k; j++) {
            const vec8 c = (vec8){0} + coef[t * k + j];
            const float *atom = atoms + (int64_t)idx[t * k + j] * dim;
            for (int64_t v = 0; v < vectors; v++) key[v] += c * load8(atom + 8 * v);
        }
        const int64_t row = (int64_t)positions[t] * (dim / 2);
        const float *cs = cos_table + row, *sn = sin_table + row;
        for (int64_t v = 0; v < half; v++) {
            const vec8 co = load8(cs + 8 * v), si = load8(sn + 8 * v);
            rotated[v] = (key[v] * co - key[v + half] * si) * rope_scaling;
            rotated[v + half] = (key[v + half] * co + key[v] * si) * rope_scaling;
        }
        for (int64_t r = 0; r < rows; r++) {
            const float *q = queries + r * dim;
            vec8 acc = rotated[0] * load8(q);
            for (int64_t v = 1; v < vectors; v++) acc += rotated[v] * load8(q + 8 * v);
            out[r * stride + t] = sum8(acc);
        }
    }
}

/* Pre-RoPE key scores of every slab, written like key_scores_post's. Work items are (batch, token block) and the
 * KV heads run inside, so each block's cos/sin rows are read from memory once for all heads. */
static void key_scores_pre(const codes_t *codes, const attention_t *a, float *scores, int64_t length, int threads) {
    /* 128 tokens' cos/sin rows (32 KiB at head_dim 64) stay in L1/L2 while every KV head reads them */
    const int64_t tokens = codes->tokens, k = codes->k, dim = a->dim, n_atoms = a->key_n_atoms;
    const int64_t per_block = block_tokens(codes->k) < 128 ? block_tokens(codes->k) : 128;
    const int64_t blocks = (tokens + per_block - 1) / per_block;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t item = 0; item < a->batch * blocks; item++) {
        int32_t idx[BLOCK_CODES];
        float coef[BLOCK_CODES];
        const int64_t batch = item / blocks, t0 = (item % blocks) * per_block;
        const int64_t n = tokens - t0 < per_block ? tokens - t0 : per_block;
        const int32_t *block_positions = a->positions + batch * tokens + t0;
        for (int64_t head = 0; head < a->heads; head++) {
            const int64_t bh = batch * a->heads + head, dictionary = a->key_dictionaries == 1 ? 0 : head;
            const float *atoms = a->key_atoms + dictionary * n_atoms * dim, *bias = a->key_bias + dictionary * dim;
            const float *q = a->queries + bh * a->rows * dim;
            float *o = scores + bh * a->rows * length + a->sinks + t0;
            load_block(codes, bh, t0, n, idx, coef);
#define PRE_ROPE_BLOCK(DIM)                                                                                    \
    pre_rope_block(idx, coef, n, k, atoms, bias, block_positions, a->cos_table, a->sin_table, a->rope_scaling, q, \
                   a->rows, length, o, DIM, dim)
            switch (dim) {
            case 64: PRE_ROPE_BLOCK(64); break;
            case 128: PRE_ROPE_BLOCK(128); break;
            case 256: PRE_ROPE_BLOCK(256); break;
            default: PRE_ROPE_BLOCK(0);
            }
#undef PRE_ROPE_BLOCK
        }
    }
}

/* One score row of `length` slots (sinks | codes | window, the codes' scores already in place): the dense scores,
 * scaling, softcap and mask, then the softmax. The dense slots' share of the output goes to `out`, the codes'
 * normalised weights stay in the row for the value pass, and their sum is returned (the share of the value bias).
 * A row that may attend to nothing gets zero weights, as in the reference. */
static float softmax_row(const attention_t *a, int64_t bh, int64_t r, int64_t codes, float *row, float *out) {
    const int64_t dim = a->dim, sinks = a->sinks, window = a->window, length = sinks + codes + window;
    const float *q = a->queries + (bh * a->rows + r) * dim;
    const float *sink_keys = a->sink_keys + bh * sinks * dim, *window_keys = a->window_keys + bh * window * dim;
    for (int64_t s = 0; s < sinks; s++) row[s] = dot16(q, sink_keys + s * dim, dim);
    for (int64_t w = 0; w < window; w++) row[sinks + codes + w] = dot16(q, window_keys + w * dim, dim);
    const int64_t batch = bh / a->heads, query = r % a->query_len;
    const uint8_t *visible = a->mask ? a->mask + (batch * a->query_len + query) * length : NULL;
    for (int64_t j = 0; j < length; j++) row[j] *= a->scaling;
    if (a->softcap != 0.0f)
        for (int64_t j = 0; j < length; j++) row[j] = tanhf(row[j] / a->softcap) * a->softcap;
    if (visible)
        for (int64_t j = 0; j < length; j++) row[j] = visible[j] ? row[j] : -INFINITY;
    float peak = -INFINITY;
    for (int64_t j = 0; j < length; j++) peak = row[j] > peak ? row[j] : peak;
    float total = 0.0f;
    if (peak == -INFINITY) { /* nothing visible */
        for (int64_t j = 0; j < length; j++) row[j] = 0.0f;
    } else {
        vec8 sum = {0};
        int64_t j = 0;
        for (; j + 8 <= length; j += 8) {
            const vec8 e = exp8(load8(row + j) - peak);
            store8(row + j, e);
            sum += e;
        }
        total = sum8(sum);
        for (; j < length; j++) {
            row[j] = expf(row[j] - peak);
            total += row[j];
        }
    }
    const float scale = total > 0.0f ? 1.0f / total : 0.0f;
    for (int64_t i = 0; i < dim; i++) out[i] = 0.0f;
    const float *sink_values = a->sink_values + bh * sinks * dim;
    const float *window_values = a->window_values + bh * window * dim;
    for (int64_t s = 0; s < sinks; s++) axpy8(out, row[s] * scale, sink_values + s * dim, dim);
    for (int64_t w = 0; w < window; w++) axpy8(out, row[sinks + codes + w] * scale, window_values + w * dim, dim);
    float code_weight = 0.0f;
    for (int64_t t = sinks; t < sinks + codes; t++) {
        row[t] *= scale;
        code_weight += row[t];
    }
    return code_weight;
}

/* Tokens [start, stop) of slab bh into acc[n_atoms][WIDTH], from the codes' weights of the slab's `rows` query
 * rows (w: row 0's first code slot, rows `stride` floats apart). The weights of TRANSPOSED tokens at a time are
 * copied token-major into a small buffer, lanes past `rows` zero, so that with few rows (decode: the query heads
 * of one KV head) every (token, atom) update is one multiply-add of a compile-time 4, 8 or 16 lanes. */
#define TRANSPOSED 64
#define ACCUMULATE(NAME, WIDTH)                                                                                  \
    static void NAME(const codes_t *c, const float *w, int64_t stride, int64_t rows, int64_t bh, int64_t start,  \
                     int64_t stop, float *acc) {                                                                 \
        int32_t idx[BLOCK_CODES];                                                                                \
        float coef[BLOCK_CODES], wt[TRANSPOSED * (WIDTH)];                                                       \
        const int64_t k = c->k, per_block = block_tokens(c->k);                                                  \
        for (int64_t t0 = start; t0 < stop; t0 += per_block) {                                                   \
            const int64_t n = stop - t0 < per_block ? stop - t0 : per_block;                                     \
            load_block(c, bh, t0, n, idx, coef);                                                                 \
            for (int64_t u0 = 0; u0 < n; u0 += TRANSPOSED) {                                                     \
                const int64_t m = n - u0 < TRANSPOSED ? n - u0 : TRANSPOSED;                                     \
                for (int64_t r = 0; r < (WIDTH); r++)                                                            \
                    for (int64_t t = 0; t < m; t++) wt[t * (WIDTH) + r] = r < rows ? w[r * stride + t0 + u0 + t] : 0.0f; \
                for (int64_t t = 0; t < m; t++) {                                                                \
                    const float *wtt = wt + t * (WIDTH);                                                         \
                    for (int64_t j = 0; j < k; j++) {                                                            \
                        float *slot = acc + (int64_t)idx[(u0 + t) * k + j] * (WIDTH);                           \
                        const float cj = coef[(u0 + t) * k + j];                                                 \
                        _Pragma("omp simd") for (int64_t r = 0; r < (WIDTH); r++) slot[r] += cj * wtt[r];        \
                    }                                                                                            \
                }                                                                                                \
            }                                                                                                    \
        }                                                                                                        \
    }
ACCUMULATE(accumulate_4, 4)
ACCUMULATE(accumulate_8, 8)
ACCUMULATE(accumulate_16, 16)

/* accumulate_4/8/16 for any number of rows (chunks of queries): acc[n_atoms][rows], weights read in place. */
static void accumulate_any(const codes_t *c, const float *w, int64_t stride, int64_t rows, int64_t bh, int64_t start,
                           int64_t stop, float *acc) {
    int32_t idx[BLOCK_CODES];
    float coef[BLOCK_CODES];
    const int64_t k = c->k, per_block = block_tokens(c->k);
    for (int64_t t0 = start; t0 < stop; t0 += per_block) {
        const int64_t n = stop - t0 < per_block ? stop - t0 : per_block;
        load_block(c, bh, t0, n, idx, coef);
        for (int64_t t = 0; t < n; t++) {
            for (int64_t j = 0; j < k; j++) {
                float *slot = acc + (int64_t)idx[t * k + j] * rows;
                const float cj = coef[t * k + j];
                for (int64_t r = 0; r < rows; r++) slot[r] += cj * w[r * stride + t0 + t];
            }
        }
    }
}

/* accumulate_* for codes with implicit indices (slot j is atom j, every atom present: rotated values). Dense in
 * the atom, so each token adds its k coefficients, times each row's weight, to a row-major private accumulator
 * with full-width vector multiply-adds over the atoms; acc[n_atoms][width] gets the sum at the end. */
static void accumulate_dense(const codes_t *c, const float *w, int64_t stride, int64_t rows, int64_t width,
                             int64_t bh, int64_t start, int64_t stop, float *acc, float *local) {
    int32_t idx[1];
    float coef[BLOCK_CODES];
    const int64_t k = c->k, per_block = block_tokens(c->k);
    memset(local, 0, (size_t)(rows * k) * sizeof *local);
    for (int64_t t0 = start; t0 < stop; t0 += per_block) {
        const int64_t n = stop - t0 < per_block ? stop - t0 : per_block;
        load_block(c, bh, t0, n, idx, coef);
        for (int64_t r = 0; r < rows; r++) {
            float *mine = local + r * k;
            const float *weights = w + r * stride + t0;
            for (int64_t t = 0; t < n; t++) {
                const float wt = weights[t], *ct = coef + t * k;
                if (wt == 0.0f) continue; /* masked */
                _Pragma("omp simd") for (int64_t j = 0; j < k; j++) mine[j] += wt * ct[j];
            }
        }
    }
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < k; j++) acc[j * width + r] += local[r * k + j];
}

/* Tokens per thread below which the value pass does not split a slab's tokens over threads. */
#define SPLIT_TOKENS 512

/* Attention of every query row over sinks | codes | window -> out[BH, rows, d], in four parallel passes: the
 * codes' key scores; per row the dense scores, softmax and the dense slots' output; the codes' weights
 * accumulated per atom (long contexts split into one token range per thread, each with a private accumulator);
 * per slab the atom weights times the value dictionary, plus the value bias. Nothing of size [tokens, k, d] is
 * materialised. Returns nonzero if the scratch buffers could not be allocated. */
int sta_attention(const attention_t *a, const codes_t *keys, const codes_t *values, float *out, int threads) {
    const int64_t slabs = a->batch * a->heads, rows = a->rows, codes = keys->tokens, dim = a->dim;
    const int64_t n_atoms = a->value_n_atoms, length = a->sinks + codes + a->window;
    const int64_t width = rows <= 4 ? 4 : rows <= 8 ? 8 : rows <= 16 ? 16 : rows;
    const int64_t parts = threads > 1 && codes >= (int64_t)threads * SPLIT_TOKENS ? threads : 1;
    const int64_t slab_atoms = n_atoms * width, span = (codes + parts - 1) / parts;
    float *scores = malloc((size_t)(slabs * rows * length) * sizeof *scores);
    float *code_weight = malloc((size_t)(slabs * rows) * sizeof *code_weight);
    float *acc = calloc((size_t)(parts * slabs * slab_atoms) + 1, sizeof *acc);
    /* implicit indices: each (part, slab) accumulates row-major first (accumulate_dense) */
    const int implicit = values->index_kind == INDEX_IMPLICIT;
    float *dense = implicit ? malloc((size_t)(parts * slabs * rows * values->k) * sizeof *dense + 1) : NULL;
    const int failed = scores == NULL || code_weight == NULL || acc == NULL || (implicit && dense == NULL);
    if (failed) goto done;
    if (codes) {
        if (a->atom_scores) key_scores_post(keys, a, scores, length, threads);
        else key_scores_pre(keys, a, scores, length, threads);
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t item = 0; item < slabs * rows; item++) {
        const int64_t bh = item / rows, r = item % rows;
        code_weight[item] = softmax_row(a, bh, r, codes, scores + item * length, out + item * dim);
    }
    if (codes == 0) goto done;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t item = 0; item < parts * slabs; item++) {
        const int64_t part = item / slabs, bh = item % slabs;
        const int64_t start = part * span, stop = start + span < codes ? start + span : codes;
        const float *w = scores + bh * rows * length + a->sinks;
        float *mine = acc + item * slab_atoms;
        if (start >= stop) continue;
        if (implicit) {
            accumulate_dense(values, w, length, rows, width, bh, start, stop, mine, dense + item * rows * values->k);
            continue;
        }
        switch (width) {
        case 4: accumulate_4(values, w, length, rows, bh, start, stop, mine); break;
        case 8: accumulate_8(values, w, length, rows, bh, start, stop, mine); break;
        case 16: accumulate_16(values, w, length, rows, bh, start, stop, mine); break;
        default: accumulate_any(values, w, length, rows, bh, start, stop, mine);
        }
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t bh = 0; bh < slabs; bh++) {
        const int64_t dictionary = a->value_dictionaries == 1 ? 0 : bh % a->heads;
        const float *atoms = a->value_atoms + dictionary * n_atoms * dim, *bias = a->value_bias + dictionary * dim;
        for (int64_t n = 0; n < n_atoms; n++) {
            for (int64_t r = 0; r < rows; r++) {
                float weight = 0.0f;
                for (int64_t part = 0; part < parts; part++)
                    weight += acc[(part * slabs + bh) * slab_atoms + n * width + r];
                if (weight != 0.0f) axpy8(out + (bh * rows + r) * dim, weight, atoms + n * dim, dim);
            }
        }
        for (int64_t r = 0; r < rows; r++) axpy8(out + (bh * rows + r) * dim, code_weight[bh * rows + r], bias, dim);
    }
done:
    free(scores);
    free(code_weight);
    free(acc);
    free(dense);
    return failed;
}

/* ------------------------------------------------------------------------------------------ encode-on-append */

/* |atoms . r| for OMP_GROUP residuals at once -> corr[v][n]. The dictionary comes in panels of 16 atoms,
 * panels[n / 16][d][16] (contiguous 16-atom slices of every dimension): each slice is one 16-float vector (one
 * AVX-512 register, two AVX ones) loaded once for all the group's residuals, and a panel is read sequentially. */
#define OMP_GROUP 8
static void correlate(const float *panels, int64_t n_atoms, int64_t dim, const float *residuals, float *corr) {
    for (int64_t a = 0; a < n_atoms; a += 16) {
        const float *panel = panels + a * dim;
        vec16 acc[OMP_GROUP] = {{0}};
        for (int64_t e = 0; e < dim; e++) {
            vec16 slice;
            memcpy(&slice, panel + e * 16, sizeof slice);
            for (int64_t v = 0; v < OMP_GROUP; v++) acc[v] += slice * residuals[v * dim + e];
        }
        for (int64_t v = 0; v < OMP_GROUP; v++) {
            const vec16 magnitude = (vec16)((ivec16)acc[v] & 0x7fffffff);
            memcpy(corr + v * n_atoms + a, &magnitude, sizeof magnitude);
        }
    }
}

/* Index of the first largest of c[0 .. n) (n a multiple of 8), as torch.argmax: eight running maxima with their
 * first indices, then the best lane (lowest index among equal maxima). */
static int64_t argmax_first(const float *c, int64_t n) {
    vec8 best = load8(c);
    ivec8 where = {0, 1, 2, 3, 4, 5, 6, 7}, index = where;
    for (int64_t a = 8; a < n; a += 8) {
        const vec8 v = load8(c + a);
        const ivec8 larger = v > best;
        index += 8;
        best = (vec8)(((ivec8)best & ~larger) | ((ivec8)v & larger));
        where = (where & ~larger) | (index & larger);
    }
    int lane = 0;
    for (int i = 1; i < 8; i++)
        if (best[i] > best[lane] || (best[i] == best[lane] && where[i] < where[lane])) lane = i;
    return where[lane];
}

/* One pursuit step's least-squares bookkeeping, shared by both kernels: orthogonalise the picked `atom` against
 * the `step` earlier directions in basis[k][dim] (classical Gram-Schmidt; the overlaps go to column `step` of
 * upper[k][k], the atom's norm after it to the diagonal), store its direction as basis[step], and remove it from
 * the orthogonal `residual`. Returns the projection residual . direction; *scale is 1 / that norm, or 0 for an
 * atom that adds no new direction (the residual was already exact), whose coefficient then comes out 0. */
static inline float pursuit_step(const float *atom, float *basis, float *upper, float *residual, int64_t step,
                                 int64_t k, int64_t dim, float eps, float *scale) {
    float direction[MAX_HEAD_DIM];
    memcpy(direction, atom, sizeof(float) * (size_t)dim);
    for (int64_t i = 0; i < step; i++) upper[i * k + step] = dot16(basis + i * dim, atom, dim);
    for (int64_t i = 0; i < step; i++)
#pragma omp simd
        for (int64_t e = 0; e < dim; e++) direction[e] -= upper[i * k + step] * basis[i * dim + e];
    const float norm = sqrtf(dot16(direction, direction, dim));
    const int fresh = norm > eps;
    *scale = fresh ? 1.0f / norm : 0.0f;
    upper[step * k + step] = fresh ? norm : 1.0f;
    float *out = basis + step * dim;
    for (int64_t e = 0; e < dim; e++) out[e] = direction[e] * *scale;
    const float projection = dot16(residual, out, dim);
    for (int64_t e = 0; e < dim; e++) residual[e] -= projection * out[e];
    return projection;
}

/* The coefficients on the picked atoms: upper . coef = projections, upper[k][k] upper triangular. */
static inline void back_substitute(const float *upper, const float *projections, int64_t k, float *coef) {
    for (int64_t i = k - 1; i >= 0; i--) {
        float sum = projections[i];
        for (int64_t j = i + 1; j < k; j++) sum -= upper[i * k + j] * coef[j];
        coef[i] = sum / upper[i * k + i];
    }
}

/* Greedy pursuit, as reference.omp_encode_reference computes it: k picks of the atom most correlated with a
 * residual (first maximum on ties, never an atom twice), each orthogonalised against the earlier picks (classical
 * Gram-Schmidt) and its direction removed from the orthogonal residual; one back substitution gives the least-
 * squares coefficients. The picks read the orthogonal residual (OMP), or with `matching` the matching-pursuit
 * residual, from which each pick removes only itself times its correlation. targets [m][d] (bias already
 * subtracted), atoms [n][d] unit rows, panels [n / 16][d][16] the same atoms (see correlate), n a multiple of
 * 16. Returns nonzero if scratch memory could not be allocated. */
int sta_omp_encode(const float *targets, const float *atoms, const float *panels, int64_t m, int64_t n_atoms,
                   int64_t dim, int64_t k, float eps, int matching, int64_t *out_indices, float *out_coefficients,
                   int threads) {
    const int64_t groups = (m + OMP_GROUP - 1) / OMP_GROUP;
    int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t group = 0; group < groups; group++) {
        const int64_t first = group * OMP_GROUP;
        const int64_t vectors = m - first < OMP_GROUP ? m - first : OMP_GROUP;
        /* scratch per group of vectors: small next to the group's k * 4 * N * d multiply-adds */
        float *corr = (float *)calloc((size_t)(OMP_GROUP * n_atoms), sizeof(float));
        float *residual = (float *)calloc((size_t)(OMP_GROUP * dim), sizeof(float)); /* what the picks read */
        float *orthogonal = matching ? (float *)malloc(sizeof(float) * (size_t)(OMP_GROUP * dim)) : residual;
        float *basis = (float *)malloc(sizeof(float) * (size_t)(OMP_GROUP * k * dim));
        float *upper = (float *)calloc((size_t)(OMP_GROUP * k * k), sizeof(float));
        float *projections = (float *)malloc(sizeof(float) * (size_t)(OMP_GROUP * k));
        if (!corr || !residual || !orthogonal || !basis || !upper || !projections) {
#pragma omp atomic write
            failed = 1;
        } else {
            memcpy(residual, targets + first * dim, sizeof(float) * (size_t)(vectors * dim));
            if (matching) memcpy(orthogonal, residual, sizeof(float) * (size_t)(vectors * dim));
            for (int64_t step = 0; step < k; step++) {
                correlate(panels, n_atoms, dim, residual, corr);
                for (int64_t v = 0; v < vectors; v++) {
                    float *c = corr + v * n_atoms, *r = orthogonal + v * dim;
                    float *b = basis + v * k * dim, *u = upper + v * k * k;
                    int64_t *picked = out_indices + (first + v) * k;
                    for (int64_t i = 0; i < step; i++) c[picked[i]] = -1.0f;
                    const int64_t best = argmax_first(c, n_atoms);
                    picked[step] = best;
                    const float *atom = atoms + best * dim;
                    if (matching) { /* the matching residual loses the pick times its (signed) correlation */
                        float *read = residual + v * dim;
                        const float signed_corr = dot16(read, atom, dim);
                        for (int64_t e = 0; e < dim; e++) read[e] -= signed_corr * atom[e];
                    }
                    float scale;
                    projections[v * k + step] = pursuit_step(atom, b, u, r, step, k, dim, eps, &scale);
                }
            }
            for (int64_t v = 0; v < vectors; v++)
                back_substitute(upper + v * k * k, projections + v * k, k, out_coefficients + (first + v) * k);
        }
        free(corr);
        if (matching) free(orthogonal);
        free(residual);
        free(basis);
        free(upper);
        free(projections);
    }
    return failed;
}

/* The Gram kernel's least-squares bookkeeping for its pick number `step` (picked[0 .. step]): pursuit_step's
 * numbers without its d-dimensional work. The overlaps q_i . atom (column `step` of upper, the Cholesky factor of
 * the picks' Gram matrix) come by forward substitution from the pick's row g of G, the norm of its new direction
 * from G's diagonal, and the projection q_step . target from atom . target (`atom_target`, exact). inverse[i]
 * is 1 / upper[i][i], 0 for a pick that added no direction (whose q_i is 0). Returns the projection and sets
 * inverse[step]. A pick whose new direction's squared norm is at most `min_square` (below what G's float32
 * rounding resolves) adds none: projection 0, upper[step][step] 1 and so coefficient 0, as in pursuit_step. */
static inline float cholesky_step(const float *g, const int64_t *picked, float atom_target, float *upper,
                                  float *inverse, const float *projections, int64_t step, int64_t k,
                                  float min_square, float *column) {
    /* column[i]: upper[i][step], solved in place from G[picked[i]][picked[step]] (contiguous, unlike upper's) */
    for (int64_t i = 0; i < step; i++) column[i] = g[picked[i]];
    float square = g[picked[step]], along = atom_target;
    for (int64_t j = 0; j < step; j++) {
        const float overlap = column[j] * inverse[j];
        column[j] = overlap;
        const float *row = upper + j * k;
        for (int64_t i = j + 1; i < step; i++) column[i] -= row[i] * overlap;
        square -= overlap * overlap;
        along -= overlap * projections[j];
    }
    for (int64_t i = 0; i < step; i++) upper[i * k + step] = column[i];
    const int fresh = square > min_square;
    const float norm = sqrtf(fresh ? square : 1.0f);
    upper[step * k + step] = norm;
    inverse[step] = fresh ? 1.0f / norm : 0.0f;
    return along * inverse[step];
}

/* Running first-maximum of 16 lanes: best[l] / where[l] over the blocks seen so far (strictly larger replaces, so
 * each lane keeps its first maximum; NaN never wins). A pass keeps ARGMAX_CHAINS of them, block b updating chain
 * b % ARGMAX_CHAINS, so that a block's compare-and-blend does not wait on the previous block's; the chains are
 * merged once at the end. */
typedef struct {
    vec16 best;
    ivec16 where;
} argmax16_t;
#define ARGMAX_CHAINS 4
static const ivec16 LANES = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

static inline void argmax16_start(argmax16_t chains[ARGMAX_CHAINS]) {
    for (int c = 0; c < ARGMAX_CHAINS; c++) chains[c] = (argmax16_t){.best = (vec16){0} - 1.0f, .where = {0}};
}

/* value: |correlations| of atoms index[0..16) */
static inline void argmax16_update(argmax16_t *state, vec16 value, ivec16 index) {
    const ivec16 larger = value > state->best;
    state->best = (vec16)(((ivec16)state->best & ~larger) | ((ivec16)value & larger));
    state->where = (state->where & ~larger) | (index & larger);
}

/* The first index of the largest value over all chains and lanes. */
static inline int64_t argmax16_result(argmax16_t chains[ARGMAX_CHAINS]) {
    argmax16_t *into = &chains[0];
    for (int c = 1; c < ARGMAX_CHAINS; c++) {
        const argmax16_t *other = &chains[c];
        const ivec16 take = (other->best > into->best) | ((other->best == into->best) & (other->where < into->where));
        into->best = (vec16)(((ivec16)into->best & ~take) | ((ivec16)other->best & take));
        into->where = (into->where & ~take) | (other->where & take);
    }
    int lane = 0;
    for (int i = 1; i < 16; i++)
        if (into->best[i] > into->best[lane] || (into->best[i] == into->best[lane] && into->where[i] < into->where[lane]))
            lane = i;
    return into->where[lane];
}


/* The Gram kernel keeps D q_i in IEEE half precision where the CPU converts it in one instruction (x86 F16C /
 * AVX-512F): |D q_i| <= 1, so the absolute error is below 2^-12, and each step reads half the bytes, which is
 * what bounds that kernel. Elsewhere float32. */
#if defined(__AVX512F__) || defined(__F16C__)
typedef uint16_t dq_t;
static inline vec16 load_dq(const dq_t *p) {
    vec16 v;
#ifdef __AVX512F__
    const __m512 f = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
    memcpy(&v, &f, sizeof v);
#else
    const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 8)));
    memcpy(&v, &lo, sizeof lo);
    memcpy((char *)&v + sizeof lo, &hi, sizeof hi);
#endif
    return v;
}
static inline void store_dq(dq_t *p, vec16 v) {
#ifdef __AVX512F__
    __m512 f;
    memcpy(&f, &v, sizeof f);
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
    __m256 lo, hi;
    memcpy(&lo, &v, sizeof lo);
    memcpy(&hi, (char *)&v + sizeof lo, sizeof hi);
    _mm_storeu_si128((__m128i *)p, _mm256_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    _mm_storeu_si128((__m128i *)(p + 8), _mm256_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
}
#else
typedef float dq_t;
static inline vec16 load_dq(const dq_t *p) {
    vec16 v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void store_dq(dq_t *p, vec16 v) { memcpy(p, &v, sizeof v); }
#endif

/* acc - u * x in one rounding where the CPU has fused multiply-adds (half the instructions of the hot loop) */
static inline vec16 fused_subtract(vec16 acc, float u, vec16 x) {
#ifdef __AVX512F__
    return (vec16)_mm512_fnmadd_ps(_mm512_set1_ps(u), (__m512)x, (__m512)acc);
#else
    return acc - u * x;
#endif
}

/* One step of the Gram kernel for atoms [a, a + 16 * blocks): D q_step = (G[best] - sum_i u_i D q_i) * scale,
 * correlations -= projection * D q_step, and the running argmax of their magnitudes. blocks independent
 * accumulators keep the multiply-adds over i from waiting on each other. u_i = column[i * k]. */
#define GRAM_BLOCKS ARGMAX_CHAINS
static inline void gram_update(const float *g, dq_t *projected, float *alpha, const float *column, int64_t k,
                               int64_t n_atoms, int64_t step, float scale, float projection, int64_t a, int blocks,
                               argmax16_t search[ARGMAX_CHAINS]) {
    vec16 acc[GRAM_BLOCKS];
    for (int b = 0; b < blocks; b++) memcpy(&acc[b], g + a + 16 * b, sizeof acc[b]);
    for (int64_t i = 0; i < step; i++) {
        const float u = column[i * k];
        const dq_t *earlier = projected + i * n_atoms + a;
        for (int b = 0; b < blocks; b++) acc[b] = fused_subtract(acc[b], u, load_dq(earlier + 16 * b));
    }
    for (int b = 0; b < blocks; b++) {
        const vec16 dq = acc[b] * scale;
        store_dq(projected + step * n_atoms + a + 16 * b, dq);
        vec16 corr;
        memcpy(&corr, alpha + a + 16 * b, sizeof corr);
        corr -= projection * dq;
        memcpy(alpha + a + 16 * b, &corr, sizeof corr);
        argmax16_update(&search[b], (vec16)((ivec16)corr & 0x7fffffff), LANES + (int32_t)(a + 16 * b));
    }
}

/* One matching-pursuit step for atoms [a, a + 16 * blocks): correlations -= c * G[best], and the running argmax. */
static inline void matching_update(const float *g, float *alpha, float c, int64_t a, int blocks,
                                   argmax16_t search[ARGMAX_CHAINS]) {
    for (int b = 0; b < blocks; b++) {
        vec16 row, corr;
        memcpy(&row, g + a + 16 * b, sizeof row);
        memcpy(&corr, alpha + a + 16 * b, sizeof corr);
        corr = fused_subtract(corr, c, row);
        memcpy(alpha + a + 16 * b, &corr, sizeof corr);
        argmax16_update(&search[b], (vec16)((ivec16)corr & 0x7fffffff), LANES + (int32_t)(a + 16 * b));
    }
}

/* OMP with the correlations kept up to date through the dictionary's Gram matrix instead of recomputed (Batch-OMP,
 * Rubinstein, Zibulevsky & Elad 2008): the same picks and coefficients as sta_omp_encode up to float rounding, at
 * N * (step + 1) multiply-adds per step instead of N * d. With r the residual and q the orthonormal directions
 * of the picked atoms, D r_s = D r_(s-1) - p_s D q_s and D q_s = (G[a_s] - sum_(i<s) u_is D q_i) / |.|, so
 * only one row of G = D D^T is read per step; the next pick's argmax runs in the same pass. targets [m][d] (bias
 * subtracted), atoms [n][d] unit rows, correlations [m][n] = targets . atoms^T, float32 or, with
 * `bf16_correlations`, bfloat16 (half the bytes of the largest array of the call, from a matmul twice as fast
 * where the CPU has bfloat16 dot products); each row is widened into a private float32 copy that the steps
 * update (a picked atom's entry becomes NaN, which excludes it); gram [n][n]; n a multiple of 16, k <= n. Only
 * the choice of atoms reads the correlations; the least squares are exact in float32 but kept as a Cholesky factor
 * of the picks' Gram matrix (cholesky_step: entries of G and one atom . target per step) instead of sta_omp_encode's
 * Gram-Schmidt on d-dimensional vectors (which took 12-14% of its time at N = 1024, d = 64). With `matching` the
 * picks read the matching-pursuit residual instead (as sta_omp_encode's): D r_s = D r_(s-1) - c_s G[a_s], with c_s
 * the pick's correlation, N multiply-adds per step and no D q_i at all. */
int sta_omp_encode_gram(const float *targets, const float *atoms, const void *correlations, int bf16_correlations,
                        const float *gram, int64_t m, int64_t n_atoms, int64_t dim, int64_t k, float eps, int matching,
                        int64_t *out_indices, float *out_coefficients, int threads) {
    /* 1 - sum of squared overlaps carries float32 rounding of order k * 2^-24: a new direction whose squared norm
     * is not well above it would be rounding noise, and its coefficient a large one fitted to noise */
    const float min_square = fmaxf(eps * eps, (float)k * 1e-6f);
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        /* scratch per thread: D q_i of every step and the least-squares state */
        dq_t *projected = (dq_t *)malloc(sizeof(dq_t) * (size_t)(matching ? 1 : k * n_atoms));
        float *upper = (float *)malloc(sizeof(float) * (size_t)(k * k));
        float *inverse = (float *)malloc(sizeof(float) * (size_t)k);
        float *column = (float *)malloc(sizeof(float) * (size_t)k);
        float *projections = (float *)malloc(sizeof(float) * (size_t)k);
        float *alpha = (float *)malloc(sizeof(float) * (size_t)n_atoms); /* one vector's correlations */
        if (!projected || !upper || !inverse || !column || !projections || !alpha) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(static)
            for (int64_t v = 0; v < m; v++) {
                if (bf16_correlations) {
                    const uint16_t *row = (const uint16_t *)correlations + v * n_atoms;
                    for (int64_t a = 0; a < n_atoms; a++) alpha[a] = bits_to_float((uint32_t)row[a] << 16);
                } else {
                    memcpy(alpha, (const float *)correlations + v * n_atoms, sizeof(float) * (size_t)n_atoms);
                }
                int64_t *picked = out_indices + v * k;
                const float *target = targets + v * dim;
                memset(upper, 0, sizeof(float) * (size_t)(k * k));
                argmax16_t search[ARGMAX_CHAINS];
                argmax16_start(search);
                for (int64_t a = 0; a < n_atoms; a += 16) {
                    vec16 corr;
                    memcpy(&corr, alpha + a, sizeof corr);
                    argmax16_update(&search[(a / 16) % ARGMAX_CHAINS], (vec16)((ivec16)corr & 0x7fffffff),
                                    LANES + (int32_t)a);
                }
                for (int64_t step = 0; step < k; step++) {
                    const int64_t best = argmax16_result(search);
                    const float picked_correlation = alpha[best];
                    picked[step] = best;
                    alpha[best] = NAN;
                    const float *g = gram + best * n_atoms;
                    const float projection = cholesky_step(g, picked, dot16(atoms + best * dim, target, dim), upper,
                                                           inverse, projections, step, k, min_square, column);
                    projections[step] = projection;
                    if (step + 1 == k) break;
                    const float scale = inverse[step];
                    argmax16_start(search);
                    /* the correlations' update and the next pick: MP reads one row of G, OMP also D q_i */
                    int64_t a = 0;
                    for (; a + 16 * ARGMAX_CHAINS <= n_atoms; a += 16 * ARGMAX_CHAINS)
                        if (matching)
                            matching_update(g, alpha, picked_correlation, a, ARGMAX_CHAINS, search);
                        else
                            gram_update(g, projected, alpha, upper + step, k, n_atoms, step, scale, projection, a,
                                        ARGMAX_CHAINS, search);
                    for (; a < n_atoms; a += 16)
                        if (matching)
                            matching_update(g, alpha, picked_correlation, a, 1, search);
                        else
                            gram_update(g, projected, alpha, upper + step, k, n_atoms, step, scale, projection, a, 1,
                                        search);
                }
                back_substitute(upper, projections, k, out_coefficients + v * k);
            }
        }
        free(projected);
        free(alpha);
        free(inverse);
        free(column);
        free(upper);
        free(projections);
    }
    return failed;
}

/* ------------------------------------------------------------------------------------- rotated values */

/* The codes of rotated values (rotated_values.py): for each of m vectors, its rotated coordinates r [dim] and their
 * norm, each coordinate y = r_e / norm goes to the cell of the ascending `thresholds` (lloyd_max.codebook_cells:
 * the count of thresholds strictly below y, 16 coordinates per comparison); the cells are bit-packed
 * little-endian, `bits` each, into rows[v][1 ..] (byte 0, the float8 scale, is left to the caller), and gains[v]
 * is the least-squares scale of the codebook values onto r: sum(r q) / sum(q q). One pass over each vector
 * instead of the PyTorch path's dozen passes over all of them. dim is a multiple of 16. */
void sta_rotated_encode(const float *rotated, const float *norms, const float *thresholds, int32_t n_thresholds,
                        const float *codebook, int32_t bits, int64_t m, int64_t dim, uint8_t *rows, int64_t row_bytes,
                        float *gains, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t v = 0; v < m; v++) {
        const float *r = rotated + v * dim;
        uint8_t *out = rows + v * row_bytes + 1;
        uint64_t pending = 0; /* bits not yet written, the oldest lowest */
        int held = 0;
        float along = 0.0f, square = 0.0f;
        for (int64_t e = 0; e < dim; e += 16) {
            vec16 y;
            memcpy(&y, r + e, sizeof y);
            y /= norms[v];
            ivec16 cell = {0};
            for (int32_t t = 0; t < n_thresholds; t++) cell -= y > ((vec16){0} + thresholds[t]); /* true is -1 */
            for (int lane = 0; lane < 16; lane++) {
                const float q = codebook[cell[lane]];
                along += r[e + lane] * q;
                square += q * q;
                pending |= (uint64_t)cell[lane] << held;
                held += bits;
                while (held >= 8) {
                    *out++ = (uint8_t)pending;
                    pending >>= 8;
                    held -= 8;
                }
            }
        }
        if (held) *out = (uint8_t)pending;
        gains[v] = along / square;
    }
}
