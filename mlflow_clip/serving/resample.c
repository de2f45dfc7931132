/*
 * _mlflow_clip_resample: CLIP's resize + center crop + normalize in one pass, bit-for-bit equal
 * to Pillow's convolution resampling (the fixed-point arithmetic of Image.resize for 8-bit
 * images) followed by Image.crop, numpy's lookup-table normalization and the CHW layout.
 *
 * Only the pixels that survive the crop are computed: the horizontal pass runs on the columns
 * and rows the crop and the vertical filter need, the vertical pass on the crop's rows. Each
 * output pixel's weights depend only on its own index, never on its neighbours', so computing a
 * subset gives the same values as Pillow's full resize. The weights are computed in double
 * precision exactly as Pillow computes them (same expressions, same order, no fused multiply-add),
 * then rounded to 22-bit fixed point; the sums are exact integer arithmetic, so the result does
 * not depend on the order of the additions.
 *
 * Serving side: needs only the C library and Python's C API (buffers, no numpy headers).
 * Source pixels come as a buffer or, without a copy, as a Pillow image's Arrow export.
 * The pure-Python fallback in mlflow_clip.preprocess gives the same pixels.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PRECISION_BITS 22
#define HALF (1 << (PRECISION_BITS - 1))

#ifndef M_PI
#define M_PI 3.14159265358979323846
#endif

/* ------------------------------------------------------------------------------------------ */
/* Filters: the same piecewise functions and supports as Pillow's Resampling filters.          */

static double
filter_box(double x) {
    return (x > -0.5 && x <= 0.5) ? 1.0 : 0.0;
}

static double
filter_bilinear(double x) {
    if (x < 0.0) {
        x = -x;
    }
    return x < 1.0 ? 1.0 - x : 0.0;
}

static double
filter_hamming(double x) {
    if (x < 0.0) {
        x = -x;
    }
    if (x == 0.0) {
        return 1.0;
    }
    if (x >= 1.0) {
        return 0.0;
    }
    x = x * M_PI;
    return sin(x) / x * (0.54f + 0.46f * cos(x));
}

static double
filter_bicubic(double x) {
    const double a = -0.5;
    if (x < 0.0) {
        x = -x;
    }
    if (x < 1.0) {
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    }
    if (x < 2.0) {
        return (((x - 5) * x + 8) * x - 4) * a;
    }
    return 0.0;
}

static double
sinc(double x) {
    if (x == 0.0) {
        return 1.0;
    }
    x = x * M_PI;
    return sin(x) / x;
}

static double
filter_lanczos(double x) {
    return (-3.0 <= x && x < 3.0) ? sinc(x) * sinc(x / 3) : 0.0;
}

typedef struct {
    const char *name;
    double (*fn)(double);
    double support;
} Filter;

static const Filter FILTERS[] = {
    {"box", filter_box, 0.5},
    {"bilinear", filter_bilinear, 1.0},
    {"hamming", filter_hamming, 1.0},
    {"bicubic", filter_bicubic, 2.0},
    {"lanczos", filter_lanczos, 3.0},
};

/* ------------------------------------------------------------------------------------------ */
/* Weights for output indices [first, first + count) of an axis resampled from in_size to      */
/* out_size: for each, the first input index, the number of taps, and `ksize` int32 weights.   */

typedef struct {
    int ksize;
    int *start;   /* [count] */
    int *taps;    /* [count] */
    int32_t *k;   /* [count * ksize] */
} Weights;

static void
weights_free(Weights *w) {
    free(w->start);
    free(w->taps);
    free(w->k);
    w->start = w->taps = NULL;
    w->k = NULL;
}

static int
weights_compute(Weights *w, const Filter *f, int in_size, int out_size, int first, int count) {
    /* Pillow passes the box as C floats; for a whole-image resize it is (0, in_size). */
    float in0 = 0.0f, in1 = (float)in_size;
    double scale, filterscale, support, ss;
    double *pre;
    int i;

    filterscale = scale = (double)(in1 - in0) / out_size;
    if (filterscale < 1.0) {
        filterscale = 1.0;
    }
    support = f->support * filterscale;
    w->ksize = (int)ceil(support) * 2 + 1;
    ss = 1.0 / filterscale;

    w->start = malloc(sizeof(int) * (size_t)count);
    w->taps = malloc(sizeof(int) * (size_t)count);
    w->k = calloc((size_t)count * (size_t)w->ksize, sizeof(int32_t));
    pre = malloc(sizeof(double) * (size_t)w->ksize);
    if (!w->start || !w->taps || !w->k || !pre) {
        free(pre);
        weights_free(w);
        return -1;
    }
    for (i = 0; i < count; i++) {
        int xx = first + i, x, xmin, xmax;
        double center = in0 + (xx + 0.5) * scale;
        double ww = 0.0;
        int32_t *k = &w->k[(size_t)i * w->ksize];

        xmin = (int)(center - support + 0.5);
        if (xmin < 0) {
            xmin = 0;
        }
        xmax = (int)(center + support + 0.5);
        if (xmax > in_size) {
            xmax = in_size;
        }
        xmax -= xmin;
        for (x = 0; x < xmax; x++) {
            double v = f->fn((x + xmin - center + 0.5) * ss);
            pre[x] = v;
            ww += v;
        }
        for (x = 0; x < xmax; x++) {
            if (ww != 0.0) {
                pre[x] /= ww;
            }
            k[x] = pre[x] < 0 ? (int32_t)(-0.5 + pre[x] * (1 << PRECISION_BITS))
                              : (int32_t)(0.5 + pre[x] * (1 << PRECISION_BITS));
        }
        w->start[i] = xmin;
        w->taps[i] = xmax;
    }
    free(pre);
    return 0;
}

static inline uint8_t
clip8(int32_t v) {
    v >>= PRECISION_BITS;
    return v < 0 ? 0 : (v > 255 ? 255 : (uint8_t)v);
}

/* ------------------------------------------------------------------------------------------ */
/* The two passes.                                                                             */

/* Horizontal: rows [0, nrows) of `src` (row_stride bytes apart, bpp bytes per pixel, the
 * first nch of them used), output columns described by `w` (ncols of them, input indices
 * counted from `col0`) into `dst` [nrows][ncols][nch]. */
static void
pass_horizontal(
    const uint8_t *src, Py_ssize_t row_stride, int bpp, int nch, int col0, int nrows,
    const Weights *w, int ncols, uint8_t *dst
) {
    int r, j, t;
    for (r = 0; r < nrows; r++) {
        const uint8_t *line = src + (Py_ssize_t)r * row_stride;
        uint8_t *out = dst + (size_t)r * ncols * nch;
        if (nch == 3) {
            for (j = 0; j < ncols; j++) {
                const int32_t *k = &w->k[(size_t)j * w->ksize];
                const uint8_t *p = line + (Py_ssize_t)(w->start[j] - col0) * bpp;
                int32_t s0 = HALF, s1 = HALF, s2 = HALF;
                const int n = w->taps[j];
                for (t = 0; t < n; t++) {
                    s0 += p[0] * k[t];
                    s1 += p[1] * k[t];
                    s2 += p[2] * k[t];
                    p += bpp;
                }
                out[0] = clip8(s0);
                out[1] = clip8(s1);
                out[2] = clip8(s2);
                out += 3;
            }
        } else {
            for (j = 0; j < ncols; j++) {
                const int32_t *k = &w->k[(size_t)j * w->ksize];
                const uint8_t *p = line + (Py_ssize_t)(w->start[j] - col0) * bpp;
                int32_t s0 = HALF;
                const int n = w->taps[j];
                for (t = 0; t < n; t++) {
                    s0 += p[0] * k[t];
                    p += bpp;
                }
                *out++ = clip8(s0);
            }
        }
    }
}

/* The same horizontal pass for RGB pixels, 4 bytes each (RGBX, Pillow's own layout) or 3 (a
 * packed array), with AVX2: four taps per step. The four pixels' bytes are shuffled into pairs
 * of taps per channel, [R0 R1 G0 G1 B0 B1 0 0 | R2 R3 G2 G3 B2 B3 0 0], widened to 16-bit words
 * and multiplied pairwise by the taps' weights (vpmaddwd). A 22-bit weight does not fit a word,
 * so it is split as k = hi * 2048 + lo with lo in [0, 2047]: two products per pair, both exact,
 * and sum(p * k) = (sum(p * hi) << 11) + sum(p * lo) in exact integer arithmetic, so the result
 * equals the scalar pass's. `wide` holds, per output column, 32 words per step of four taps (16
 * of hi, then 16 of lo), the taps past the column's last weighted 0. Only built for x86-64 with
 * GCC or Clang (and not with -DMLFLOW_CLIP_NO_SIMD, which tests the scalar pass), and only run
 * when the CPU has AVX2. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(MLFLOW_CLIP_NO_SIMD)
#include <immintrin.h>
#define HAVE_AVX2_PATH 1
#define WEIGHT_LOW_BITS 11

__attribute__((target("avx2"))) static inline void
madd_step(__m128i bytes, __m128i pairs, const int16_t *k, __m256i *hi, __m256i *lo) {
    const __m256i px = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(bytes, pairs));
    *hi = _mm256_add_epi32(*hi, _mm256_madd_epi16(px, _mm256_loadu_si256((const __m256i *)k)));
    *lo = _mm256_add_epi32(*lo, _mm256_madd_epi16(px, _mm256_loadu_si256((const __m256i *)(k + 16))));
}

__attribute__((target("avx2"))) static inline void
rgb_avx2_kernel(
    const uint8_t *src, Py_ssize_t row_stride, const int bpp, int col0, int nrows,
    const Weights *w, const int16_t *wide, int wide_stride, int ncols, uint8_t *dst
) {
    const __m128i pairs = bpp == 4
        ? _mm_setr_epi8(0, 4, 1, 5, 2, 6, -1, -1, 8, 12, 9, 13, 10, 14, -1, -1)
        : _mm_setr_epi8(0, 3, 1, 4, 2, 5, -1, -1, 6, 9, 7, 10, 8, 11, -1, -1);
    const uint8_t *end = src + (Py_ssize_t)nrows * row_stride; /* bytes the caller owns */
    int r, j, t;
    for (r = 0; r < nrows; r++) {
        const uint8_t *line = src + (Py_ssize_t)r * row_stride;
        uint8_t *out = dst + (size_t)r * ncols * 3;
        for (j = 0; j < ncols; j++) {
            const int16_t *k = wide + (size_t)j * wide_stride;
            const uint8_t *p = line + (Py_ssize_t)(w->start[j] - col0) * bpp;
            const int n = w->taps[j], steps = (n + 3) / 4;
            __m256i hi = _mm256_setzero_si256(), lo = _mm256_setzero_si256();
            __m128i sum;
            int32_t bytes3;
            if (p + (Py_ssize_t)(steps - 1) * 4 * bpp + 16 <= end) {
                /* 16 bytes a step, the ones past the taps weighted 0: all inside the buffer */
                for (t = 0; t < steps; t++, k += 32) {
                    madd_step(_mm_loadu_si128((const __m128i *)(p + t * 4 * bpp)), pairs, k, &hi, &lo);
                }
            } else { /* the last pixels of the buffer: copy only the taps' own bytes */
                for (t = 0; t < n; t += 4, k += 32) {
                    uint8_t last[16] = {0};
                    memcpy(last, p + t * bpp, (size_t)(n - t < 4 ? n - t : 4) * bpp);
                    madd_step(_mm_loadu_si128((const __m128i *)last), pairs, k, &hi, &lo);
                }
            }
            hi = _mm256_add_epi32(_mm256_slli_epi32(hi, WEIGHT_LOW_BITS), lo);
            sum = _mm_add_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1));
            /* clip8 on the four lanes: shift, then saturate to int16 and to [0, 255] */
            sum = _mm_srai_epi32(_mm_add_epi32(sum, _mm_set1_epi32(HALF)), PRECISION_BITS);
            sum = _mm_packus_epi16(_mm_packs_epi32(sum, sum), sum);
            bytes3 = _mm_cvtsi128_si32(sum);
            out[0] = (uint8_t)bytes3;
            out[1] = (uint8_t)(bytes3 >> 8);
            out[2] = (uint8_t)(bytes3 >> 16);
            out += 3;
        }
    }
}

/* One instance per pixel size, so the compiler drops the bpp branch from the inner loop. */
__attribute__((target("avx2"))) static void
pass_horizontal_rgbx_avx2(
    const uint8_t *src, Py_ssize_t row_stride, int col0, int nrows, const Weights *w,
    const int16_t *wide, int wide_stride, int ncols, uint8_t *dst
) {
    rgb_avx2_kernel(src, row_stride, 4, col0, nrows, w, wide, wide_stride, ncols, dst);
}

__attribute__((target("avx2"))) static void
pass_horizontal_rgb_avx2(
    const uint8_t *src, Py_ssize_t row_stride, int col0, int nrows, const Weights *w,
    const int16_t *wide, int wide_stride, int ncols, uint8_t *dst
) {
    rgb_avx2_kernel(src, row_stride, 3, col0, nrows, w, wide, wide_stride, ncols, dst);
}

static int
have_avx2(void) {
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = __builtin_cpu_supports("avx2") ? 1 : 0;
    }
    return known;
}
#else
#define HAVE_AVX2_PATH 0
#endif

/* The horizontal pass, by the fastest kernel that applies. Returns -1 when out of memory. */
static int
horizontal(
    const uint8_t *src, Py_ssize_t row_stride, int bpp, int nch, int col0, int nrows,
    const Weights *w, int ncols, uint8_t *dst
) {
#if HAVE_AVX2_PATH
    if ((bpp == 4 || bpp == 3) && nch == 3 && have_avx2()) {
        const int stride = (w->ksize + 3) / 4 * 32;
        int16_t *wide = calloc((size_t)ncols * stride, sizeof(int16_t));
        int j, t, c;
        if (!wide) {
            return -1;
        }
        for (j = 0; j < ncols; j++) {
            for (t = 0; t < w->taps[j]; t++) {
                const int32_t k = w->k[(size_t)j * w->ksize + t];
                const int32_t low = k & ((1 << WEIGHT_LOW_BITS) - 1);
                const int32_t high = (k - low) / (1 << WEIGHT_LOW_BITS);
                /* step t / 4; lane t % 4 / 2 (8 words each); word t % 2 of each channel's pair */
                int16_t *at = wide + (size_t)j * stride + t / 4 * 32 + t % 4 / 2 * 8 + t % 2;
                if (high < INT16_MIN || high > INT16_MAX) { /* no filter weighs a pixel this much */
                    free(wide);
                    pass_horizontal(src, row_stride, bpp, nch, col0, nrows, w, ncols, dst);
                    return 0;
                }
                for (c = 0; c < 3; c++) {
                    at[c * 2] = (int16_t)high;
                    at[c * 2 + 16] = (int16_t)low;
                }
            }
        }
        if (bpp == 4) {
            pass_horizontal_rgbx_avx2(src, row_stride, col0, nrows, w, wide, stride, ncols, dst);
        } else {
            pass_horizontal_rgb_avx2(src, row_stride, col0, nrows, w, wide, stride, ncols, dst);
        }
        free(wide);
        return 0;
    }
#endif
    pass_horizontal(src, row_stride, bpp, nch, col0, nrows, w, ncols, dst);
    return 0;
}

/* Vertical: output rows described by `w` (nrows of them, input indices counted from `row0`),
 * each from `taps` rows of `src` (row_stride bytes apart, `width` bytes used), into `dst`
 * [nrows][width]. The inner loops run along the row, so they vectorize. */
static void
pass_vertical(
    const uint8_t *src, Py_ssize_t row_stride, int width, int row0, const Weights *w, int nrows,
    int32_t *acc, uint8_t *dst
) {
    int i, x, t;
    for (i = 0; i < nrows; i++) {
        const int32_t *k = &w->k[(size_t)i * w->ksize];
        const uint8_t *first = src + (Py_ssize_t)(w->start[i] - row0) * row_stride;
        uint8_t *out = dst + (size_t)i * width;
        for (x = 0; x < width; x++) {
            acc[x] = HALF;
        }
        for (t = 0; t < w->taps[i]; t++) {
            const uint8_t *line = first + (Py_ssize_t)t * row_stride;
            const int32_t kt = k[t];
            for (x = 0; x < width; x++) {
                acc[x] += line[x] * kt;
            }
        }
        for (x = 0; x < width; x++) {
            out[x] = clip8(acc[x]);
        }
    }
}

/* ------------------------------------------------------------------------------------------ */

typedef struct {
    const uint8_t *src;
    Py_ssize_t row_stride;
    int width, height, bpp, nch;
    int new_width, new_height, left, top, size;
    int vertical_first; /* the pass order the installed Pillow uses for this resize */
    const Filter *filter;
    const float *table; /* [3][256] */
    float *out;         /* [3][size][size] */
} Job;

/* Returns 0, or -1 when out of memory. Runs without the GIL. */
static int
run_job(const Job *job) {
    const int size = job->size, nch = job->nch, bpp = job->bpp;
    Weights wh = {0}, wv = {0};
    uint8_t *tmp = NULL, *crop = NULL; /* crop: the size x size pixels, nch bytes each */
    int32_t *acc = NULL;
    int i, c, status = -1;

    /* Pillow skips the pass of an axis whose size does not change; the weights of such an axis
     * are 1 on the pixel itself and 0 elsewhere (every filter is 1 at 0 and 0 at the other
     * integers), so running the pass copies its pixels exactly and both cases agree. */
    if (weights_compute(&wh, job->filter, job->width, job->new_width, job->left, size) < 0 ||
        weights_compute(&wv, job->filter, job->height, job->new_height, job->top, size) < 0 ||
        !(crop = malloc((size_t)size * size * nch))) {
        goto done;
    }
    if (job->vertical_first) {
        /* Vertical pass on the columns the horizontal filter reads, then horizontal. */
        const int col0 = wh.start[0], col1 = wh.start[size - 1] + wh.taps[size - 1];
        const int width = (col1 - col0) * bpp;
        tmp = malloc((size_t)size * width);
        acc = malloc(sizeof(int32_t) * (size_t)width);
        if (!tmp || !acc) {
            goto done;
        }
        pass_vertical(job->src + (Py_ssize_t)col0 * bpp, job->row_stride, width, 0, &wv, size, acc, tmp);
        if (horizontal(tmp, width, bpp, nch, col0, size, &wh, size, crop) < 0) {
            goto done;
        }
    } else {
        /* Horizontal pass on the rows the vertical filter reads, then vertical. */
        const int row0 = wv.start[0], row1 = wv.start[size - 1] + wv.taps[size - 1];
        const int width = size * nch;
        tmp = malloc((size_t)(row1 - row0) * width);
        acc = malloc(sizeof(int32_t) * (size_t)width);
        if (!tmp || !acc) {
            goto done;
        }
        if (horizontal(
                job->src + (Py_ssize_t)row0 * job->row_stride, job->row_stride, bpp, nch, 0,
                row1 - row0, &wh, size, tmp
            ) < 0) {
            goto done;
        }
        pass_vertical(tmp, width, width, row0, &wv, size, acc, crop);
    }
    for (c = 0; c < 3; c++) {
        const float *table = job->table + 256 * c;
        const uint8_t *pixel = crop + (nch == 1 ? 0 : c);
        float *plane = job->out + (size_t)c * size * size;
        for (i = 0; i < size * size; i++) {
            plane[i] = table[pixel[(size_t)i * nch]];
        }
    }
    status = 0;
done:
    weights_free(&wh);
    weights_free(&wv);
    free(tmp);
    free(crop);
    free(acc);
    return status;
}

static int
get_filter(const char *name, const Filter **filter) {
    size_t i;
    for (i = 0; i < sizeof(FILTERS) / sizeof(FILTERS[0]); i++) {
        if (strcmp(FILTERS[i].name, name) == 0) {
            *filter = &FILTERS[i];
            return 0;
        }
    }
    PyErr_Format(
        PyExc_ValueError, "Received filter=%s; expected box, bilinear, hamming, bicubic or lanczos.",
        name
    );
    return -1;
}

/* The Arrow C data interface structs (a stable ABI), for Pillow's zero-copy image export. */
struct ArrowSchema {
    const char *format;
    const char *name;
    const char *metadata;
    int64_t flags;
    int64_t n_children;
    struct ArrowSchema **children;
    struct ArrowSchema *dictionary;
    void (*release)(struct ArrowSchema *);
    void *private_data;
};

struct ArrowArray {
    int64_t length;
    int64_t null_count;
    int64_t offset;
    int64_t n_buffers;
    int64_t n_children;
    const void **buffers;
    struct ArrowArray **children;
    struct ArrowArray *dictionary;
    void (*release)(struct ArrowArray *);
    void *private_data;
};

/* The pixel bytes of Image.__arrow_c_array__()'s (schema, array) pair: "C" (uint8, mode L) or
 * "+w:4" of "C" (4 bytes per pixel, modes RGB/RGBX/RGBA), `count` bytes in all. NULL, with an
 * exception set, for anything else. The capsules own the memory; the caller keeps them alive. */
static const uint8_t *
arrow_pixels(PyObject *pair, Py_ssize_t count) {
    struct ArrowSchema *schema;
    struct ArrowArray *array;
    if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
        goto bad;
    }
    schema = PyCapsule_GetPointer(PyTuple_GET_ITEM(pair, 0), "arrow_schema");
    array = PyCapsule_GetPointer(PyTuple_GET_ITEM(pair, 1), "arrow_array");
    if (!schema || !array || !schema->format || !array->release) {
        PyErr_Clear();
        goto bad;
    }
    if (strcmp(schema->format, "+w:4") == 0 && schema->n_children == 1 &&
        schema->children[0]->format && strcmp(schema->children[0]->format, "C") == 0 &&
        array->n_children == 1 && array->offset == 0) {
        array = array->children[0];
    } else if (strcmp(schema->format, "C") != 0) {
        goto bad;
    }
    if (array->n_buffers != 2 || array->null_count != 0 || !array->buffers[1] ||
        array->length != count) {
        goto bad;
    }
    return (const uint8_t *)array->buffers[1] + array->offset;
bad:
    PyErr_SetString(PyExc_ValueError, "pixels is not an Arrow export of an 8-bit Pillow image.");
    return NULL;
}

PyDoc_STRVAR(
    resize_crop_doc,
    "resize_crop(pixels, width, height, channels, new_width, new_height, left, top, size,\n"
    "            filter, vertical_first, table, out)\n"
    "\n"
    "Resize a width x height image to new_width x new_height with Pillow's `filter` (the\n"
    "vertical pass first if `vertical_first`), keep the size x size square at (left, top), map\n"
    "each byte through `table` (float32 [3, 256], one row per output channel) and write float32\n"
    "[3, size, size] into `out`. `pixels` is a C-contiguous uint8 buffer of `channels` bytes per\n"
    "pixel (1 gray, 3 RGB, 4 RGBX whose fourth byte is ignored), or the pair returned by a Pillow\n"
    "image's __arrow_c_array__() (no copy). Releases the GIL while it works."
);

static PyObject *
resize_crop(PyObject *Py_UNUSED(module), PyObject *args) {
    PyObject *pixels_obj, *table_obj, *out_obj;
    Py_buffer pixels = {0}, table = {0}, out = {0};
    const char *filter_name;
    Job job;
    int channels, status;
    Py_ssize_t count;
    PyObject *result = NULL;

    if (!PyArg_ParseTuple(
            args, "OiiiiiiiispOO:resize_crop", &pixels_obj, &job.width, &job.height, &channels,
            &job.new_width, &job.new_height, &job.left, &job.top, &job.size, &filter_name,
            &job.vertical_first, &table_obj, &out_obj
        )) {
        return NULL;
    }
    if (get_filter(filter_name, &job.filter) < 0) {
        return NULL;
    }
    if (channels != 1 && channels != 3 && channels != 4) {
        PyErr_Format(PyExc_ValueError, "Received channels=%d; expected 1, 3 or 4.", channels);
        return NULL;
    }
    if (job.width < 1 || job.height < 1 || job.width > (1 << 24) || job.height > (1 << 24)) {
        PyErr_SetString(PyExc_ValueError, "width and height must be between 1 and 2**24.");
        return NULL;
    }
    if (job.size < 1 || job.new_width < job.size || job.new_height < job.size || job.left < 0 ||
        job.top < 0 || job.left > job.new_width - job.size || job.top > job.new_height - job.size) {
        PyErr_SetString(PyExc_ValueError, "The crop must lie inside the resized image.");
        return NULL;
    }
    count = (Py_ssize_t)job.width * job.height * channels;
    if (PyTuple_Check(pixels_obj)) {
        if (!(job.src = arrow_pixels(pixels_obj, count))) {
            return NULL;
        }
    } else {
        if (PyObject_GetBuffer(pixels_obj, &pixels, PyBUF_C_CONTIGUOUS) < 0) {
            return NULL;
        }
        if (pixels.len != count) {
            PyErr_SetString(PyExc_ValueError, "pixels must hold width * height * channels bytes.");
            goto done;
        }
        job.src = pixels.buf;
    }
    if (PyObject_GetBuffer(table_obj, &table, PyBUF_C_CONTIGUOUS) < 0) {
        goto done;
    }
    if (PyObject_GetBuffer(out_obj, &out, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) {
        goto done;
    }
    if (table.len != (Py_ssize_t)(3 * 256 * sizeof(float))) {
        PyErr_SetString(PyExc_ValueError, "table must be float32 [3, 256].");
        goto done;
    }
    if (out.len != (Py_ssize_t)(3 * (Py_ssize_t)job.size * job.size * sizeof(float))) {
        PyErr_SetString(PyExc_ValueError, "out must be float32 [3, size, size].");
        goto done;
    }
    job.bpp = channels;
    job.nch = channels == 1 ? 1 : 3;
    job.row_stride = (Py_ssize_t)job.width * channels;
    job.table = table.buf;
    job.out = out.buf;
    Py_BEGIN_ALLOW_THREADS;
    status = run_job(&job);
    Py_END_ALLOW_THREADS;
    if (status < 0) {
        PyErr_NoMemory();
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    if (pixels.obj) {
        PyBuffer_Release(&pixels);
    }
    if (table.obj) {
        PyBuffer_Release(&table);
    }
    if (out.obj) {
        PyBuffer_Release(&out);
    }
    return result;
}

static PyMethodDef methods[] = {
    {"resize_crop", resize_crop, METH_VARARGS, resize_crop_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_mlflow_clip_resample",
    .m_doc = "CLIP's resize, center crop and normalization in one native pass, bit-exact with Pillow.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__mlflow_clip_resample(void) {
    PyObject *m = PyModule_Create(&module);
    /* Bumped whenever resize_crop's contract changes; callers check it before use. */
    if (m && PyModule_AddIntConstant(m, "API_VERSION", 1) < 0) {
        Py_DECREF(m);
        return NULL;
    }
#ifdef MLFLOW_CLIP_SOURCE_SHA256
    /* The SHA-256 of this file, passed by the build: which source a binary was built from. */
    if (m && PyModule_AddStringConstant(m, "SOURCE_SHA256", MLFLOW_CLIP_SOURCE_SHA256) < 0) {
        Py_DECREF(m);
        return NULL;
    }
#endif
    return m;
}
