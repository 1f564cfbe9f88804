// Matrix products with llama.cpp block-quantized weights (Q4_1, Q8_0) and float32 activations.
// Built by gridserve.replica.gguf_blocks with g++ -O3 -march=native -fopenmp for the CPU it runs on, and
// used only where that CPU has AVX-512. Every product is the float32 weight gguf's dequantize gives
// (d * q + m, exact in float32) times the float32 activation, summed in float32 in a fixed order per
// output, so a row's result does not depend on the other rows of the batch.
#include <stdint.h>
#include <math.h>
#if !defined(__AVX512F__)
#error "gguf_blocks needs AVX-512 (AVX512F)"
#endif
#include <immintrin.h>

namespace {

const int QK = 32;   // weights per block
const int MT = 16;   // rows of x one pass over a weight row serves

inline void q4_1_block(const uint8_t* qs, float d, float m, __m512& w0, __m512& w1) {
  __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)qs));
  __m512 vd = _mm512_set1_ps(d), vm = _mm512_set1_ps(m);
  w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(15))), vd, vm);
  w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4)), vd, vm);
}

inline void q8_0_block(const int8_t* qs, float d, __m512& w0, __m512& w1) {
  __m512 vd = _mm512_set1_ps(d);
  w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)qs))), vd);
  w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(qs + 16)))), vd);
}

// y[i * ldy] = x[i] . w for the rows i < R of x, w being one weight row of nb blocks.
template <int R, typename Block>
inline void row_dot(const float* x, int64_t K, int64_t nb, Block block, float* y, int64_t ldy) {
  __m512 acc[R];
  for (int i = 0; i < R; i++) acc[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    __m512 w0, w1;
    block(b, w0, w1);
    for (int i = 0; i < R; i++) {
      const float* xi = x + i * K + b * QK;
      acc[i] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xi), acc[i]);
      acc[i] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xi + 16), acc[i]);
    }
  }
  for (int i = 0; i < R; i++) y[i * ldy] = _mm512_reduce_add_ps(acc[i]);
}

template <typename Block>
inline void rows_dot(int r, const float* x, int64_t K, int64_t nb, Block block, float* y, int64_t ldy) {
  switch (r) {
#define CASE(n) case n: row_dot<n>(x, K, nb, block, y, ldy); break;
    CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
    CASE(9) CASE(10) CASE(11) CASE(12) CASE(13) CASE(14) CASE(15) CASE(16)
#undef CASE
  }
}

}  // namespace

extern "C" {

// y[M, N] = x[M, K] . W[N, K]^T, W in Q4_1: qs [N, K/32, 16] (low nibble weight j, high weight j + 16), d, m [N, K/32].
void gs_q4_1_matmul(const float* x, int64_t M, int64_t K, const uint8_t* qs, const float* d, const float* m,
                    int64_t N, float* y) {
  const int64_t nb = K / QK;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; n++) {
    const uint8_t* qn = qs + n * nb * 16;
    const float* dn = d + n * nb;
    const float* mn = m + n * nb;
    for (int64_t i0 = 0; i0 < M; i0 += MT) {
      int r = (int)(M - i0 < MT ? M - i0 : MT);
      rows_dot(r, x + i0 * K, K, nb, [=](int64_t b, __m512& w0, __m512& w1) { q4_1_block(qn + b * 16, dn[b], mn[b], w0, w1); },
               y + i0 * N + n, N);
    }
  }
}

// The same with W in Q8_0: qs [N, K/32, 32] int8, d [N, K/32].
void gs_q8_0_matmul(const float* x, int64_t M, int64_t K, const int8_t* qs, const float* d, int64_t N, float* y) {
  const int64_t nb = K / QK;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; n++) {
    const int8_t* qn = qs + n * nb * QK;
    const float* dn = d + n * nb;
    for (int64_t i0 = 0; i0 < M; i0 += MT) {
      int r = (int)(M - i0 < MT ? M - i0 : MT);
      rows_dot(r, x + i0 * K, K, nb, [=](int64_t b, __m512& w0, __m512& w1) { q8_0_block(qn + b * QK, dn[b], w0, w1); },
               y + i0 * N + n, N);
    }
  }
}

// W back to float32 [N, K], as gguf's dequantize computes it (d * q + m: d * q is exact in float32).
void gs_q4_1_dequant(const uint8_t* qs, const float* d, const float* m, int64_t N, int64_t K, float* w) {
  const int64_t nb = K / QK;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N * nb; n++) {
    const uint8_t* q = qs + n * 16;
    float* out = w + n * QK;
    for (int j = 0; j < 16; j++) {
      out[j] = fmaf((float)(q[j] & 15), d[n], m[n]);
      out[j + 16] = fmaf((float)(q[j] >> 4), d[n], m[n]);
    }
  }
}

void gs_q8_0_dequant(const int8_t* qs, const float* d, int64_t N, int64_t K, float* w) {
  const int64_t nb = K / QK;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N * nb; n++)
    for (int j = 0; j < QK; j++) w[n * QK + j] = (float)qs[n * QK + j] * d[n];
}

}  // extern "C"
