/* vq_copy: memcpy for guest <-> host copies that holds its speed at every alignment.
 *
 * glibc 2.36's memcpy uses `rep movsb` above a size threshold; on AMD Zen that path
 * collapses when (dst - src) % 64 is 1, 8, 16, ... (docs/performance.md).  A Python
 * bytearray is only 16-byte aligned, so every device copy could hit it.  For large
 * copies we use an AVX2 loop instead: unaligned 32-byte loads, stores aligned to the
 * destination, whose speed does not depend on the relative alignment.  Small copies
 * and CPUs without AVX2 keep memcpy (below the threshold glibc does not use rep movsb).
 */
#ifndef VQ_COPY_H
#define VQ_COPY_H
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define VQ_HAVE_AVX2_PATH 1

__attribute__((target("avx2")))
static void vq_copy_avx2(unsigned char *d, const unsigned char *s, size_t n)
{
    /* Align the destination to 32 bytes: the head is one unaligned 32-byte move. */
    size_t head = (32 - ((uintptr_t)d & 31)) & 31;
    if (head) {
        _mm256_storeu_si256((__m256i *)d, _mm256_loadu_si256((const __m256i *)s));
        d += head; s += head; n -= head;
    }
    while (n >= 128) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(s + 0));
        __m256i b = _mm256_loadu_si256((const __m256i *)(s + 32));
        __m256i c = _mm256_loadu_si256((const __m256i *)(s + 64));
        __m256i e = _mm256_loadu_si256((const __m256i *)(s + 96));
        _mm256_store_si256((__m256i *)(d + 0), a);
        _mm256_store_si256((__m256i *)(d + 32), b);
        _mm256_store_si256((__m256i *)(d + 64), c);
        _mm256_store_si256((__m256i *)(d + 96), e);
        d += 128; s += 128; n -= 128;
    }
    while (n >= 32) {
        _mm256_store_si256((__m256i *)d, _mm256_loadu_si256((const __m256i *)s));
        d += 32; s += 32; n -= 32;
    }
    if (n) /* the tail: one unaligned move ending exactly at the end */
        _mm256_storeu_si256((__m256i *)(d + n - 32),
                            _mm256_loadu_si256((const __m256i *)(s + n - 32)));
}

static int vq_avx2_state = -1;  /* -1 unknown, 0 no, 1 yes; per extension module */

static inline int vq_have_avx2(void)
{
    if (vq_avx2_state < 0) {
        __builtin_cpu_init();
        vq_avx2_state = __builtin_cpu_supports("avx2") ? 1 : 0;
    }
    return vq_avx2_state;
}
#else
#define VQ_HAVE_AVX2_PATH 0
static inline int vq_have_avx2(void) { return 0; }
#endif

/* Copies of at least this many bytes take the AVX2 loop (glibc switches to rep movsb
 * around 2-8 KiB depending on the CPU). */
#define VQ_COPY_VECTOR_MIN 2048

/* 0: auto, 1: always memcpy (for benchmarks that show the difference). */
static int vq_copy_force_libc = 0;

static inline void vq_copy(void *dst, const void *src, size_t n)
{
#if VQ_HAVE_AVX2_PATH
    if (n >= VQ_COPY_VECTOR_MIN && !vq_copy_force_libc && vq_have_avx2()) {
        vq_copy_avx2((unsigned char *)dst, (const unsigned char *)src, n);
        return;
    }
#endif
    memcpy(dst, src, n);
}
#endif
