/* Decode one rectangle of a JPEG with libjpeg(-turbo): the rows above it are skipped without their inverse
 * DCT and colour conversion (jpeg_skip_scanlines), only the columns around it are transformed
 * (jpeg_crop_scanline), and the rows below it are entropy-decoded only, to read the file to its end, so that
 * damage anywhere in it fails as it fails a full decode.  A random-resized crop covers about half of an image
 * on average; decoding its rectangle costs about 0.8 of a full decode.
 *
 * The pixels are the full decode's pixels (same library, same DCT, fancy upsampling): the decoded columns
 * reach PAD pixels past the rectangle on either side, so the chroma upsampling at its left and right edges
 * sees the same neighbours as in a full decode (at the edge of a cropped scanline libjpeg replicates the
 * edge sample).  tests/test_jpeg_region.py checks the equality against full decodes for every chroma
 * subsampling, greyscale and progressive files.
 *
 * Called through ctypes (and from numba-compiled code), so it uses plain integer and pointer arguments.
 * Every function returns 0 on success and a negative code otherwise; a file that made libjpeg emit a warning
 * (corrupt data it would paper over) counts as a failure, so that the caller's full decoder decides what such
 * a file gives.  Built by `pip install -e .` as the extension module data_pipeline._jpeg_region. */

#include <Python.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>

#define PAD 16
#define REGION_OK 0
#define REGION_LIBJPEG_ERROR -1
#define REGION_BAD_RECTANGLE -2
#define REGION_SMALL_BUFFER -3
#define REGION_WARNING -4
#define REGION_TOO_LARGE -5

struct guarded_error {
    struct jpeg_error_mgr pub;
    jmp_buf on_error;
    int warned;
};

static void jump_out(j_common_ptr cinfo) { longjmp(((struct guarded_error *)cinfo->err)->on_error, 1); }

static void note_warning(j_common_ptr cinfo, int level) {
    if (level < 0) ((struct guarded_error *)cinfo->err)->warned = 1; /* corrupt data; level > 0: traces */
}

static void stay_quiet(j_common_ptr cinfo) { (void)cinfo; }

static void guard(struct jpeg_decompress_struct *cinfo, struct guarded_error *err) {
    cinfo->err = jpeg_std_error(&err->pub);
    err->pub.error_exit = jump_out;
    err->pub.emit_message = note_warning;
    err->pub.output_message = stay_quiet;
    err->warned = 0;
}

/* Start decompressing `data` and read its header; a libjpeg error jumps to the caller's guard (its setjmp). */
static void read_header(struct jpeg_decompress_struct *cinfo, const uint8_t *data, uint64_t length) {
    jpeg_create_decompress(cinfo);
    jpeg_mem_src(cinfo, data, (unsigned long)length);
    jpeg_read_header(cinfo, TRUE);
}

/* The image's height and width (size_out[0], size_out[1]) from its header. */
int jpeg_region_image_size(const uint8_t *data, uint64_t length, int32_t *size_out) {
    struct jpeg_decompress_struct cinfo;
    struct guarded_error err;
    guard(&cinfo, &err);
    if (setjmp(err.on_error)) {
        jpeg_destroy_decompress(&cinfo);
        return REGION_LIBJPEG_ERROR;
    }
    read_header(&cinfo, data, length);
    size_out[0] = (int32_t)cinfo.image_height;
    size_out[1] = (int32_t)cinfo.image_width;
    jpeg_destroy_decompress(&cinfo);
    return err.warned ? REGION_WARNING : REGION_OK;
}

/* Bytes of `out` that jpeg_region_decode needs for a rectangle `width` pixels wide and `height` high of an
 * image `image_width` wide: its scanlines are decoded at their cropped width (the rectangle, PAD on each side
 * and up to one iMCU of alignment, at most 32 pixels, never more than the image) before they are packed. */
uint64_t jpeg_region_buffer_bytes(int32_t height, int32_t width, int32_t image_width) {
    int32_t span = width + 2 * PAD + 32 < image_width ? width + 2 * PAD + 32 : image_width;
    return (uint64_t)height * (uint64_t)span * 3;
}

/* RGB pixels of rows [top, top + height) and columns [left, left + width) into `out`, packed (height, width,
 * 3).  `capacity` is out's size in bytes, at least jpeg_region_buffer_bytes(height, width, image width).
 * `fast_dct`: libjpeg's fast integer inverse DCT (what TurboJPEG's TJFLAG_FASTDCT and so FFCV's decoder use)
 * instead of the accurate one (torchvision's decode_jpeg, PIL).  A header that declares more than
 * `max_pixels` pixels is refused (REGION_TOO_LARGE) before anything is decoded: libjpeg sizes its buffers by
 * the declared image (a progressive file's coefficients: about 2 bytes per pixel and component), not by the
 * file, so a few kilobytes could otherwise make it allocate gigabytes. */
int jpeg_region_decode(const uint8_t *data, uint64_t length, uint8_t *out, uint64_t capacity, int32_t top,
                       int32_t left, int32_t height, int32_t width, int32_t fast_dct, uint64_t max_pixels) {
    struct jpeg_decompress_struct cinfo;
    struct guarded_error err;
    guard(&cinfo, &err);
    if (setjmp(err.on_error)) {
        jpeg_destroy_decompress(&cinfo);
        return REGION_LIBJPEG_ERROR;
    }
    read_header(&cinfo, data, length);
    cinfo.out_color_space = JCS_RGB;
    cinfo.dct_method = fast_dct ? JDCT_IFAST : JDCT_ISLOW;
    cinfo.do_fancy_upsampling = TRUE;
    if ((uint64_t)cinfo.image_height * (uint64_t)cinfo.image_width > max_pixels) {
        jpeg_destroy_decompress(&cinfo);
        return REGION_TOO_LARGE;
    }
    int32_t image_height = (int32_t)cinfo.image_height, image_width = (int32_t)cinfo.image_width;
    if (top < 0 || left < 0 || height <= 0 || width <= 0 || top > image_height - height ||
        left > image_width - width) {
        jpeg_destroy_decompress(&cinfo);
        return REGION_BAD_RECTANGLE;
    }
    jpeg_start_decompress(&cinfo);
    int32_t first = left > PAD ? left - PAD : 0;
    int32_t end = left + width + PAD < image_width ? left + width + PAD : image_width;
    JDIMENSION x = (JDIMENSION)first, span = (JDIMENSION)(end - first);
    if (first > 0 || end < image_width) jpeg_crop_scanline(&cinfo, &x, &span);
    uint64_t stride = (uint64_t)span * 3;
    if (stride * (uint64_t)height > capacity || (int32_t)x > left) {
        jpeg_abort_decompress(&cinfo);
        jpeg_destroy_decompress(&cinfo);
        return REGION_SMALL_BUFFER;
    }
    if (top > 0) jpeg_skip_scanlines(&cinfo, (JDIMENSION)top);
    JSAMPROW rows[16];
    int32_t done = 0;
    while (done < height) {
        int32_t batch = height - done < 16 ? height - done : 16;
        for (int32_t k = 0; k < batch; k++) rows[k] = out + (uint64_t)(done + k) * stride;
        JDIMENSION got = jpeg_read_scanlines(&cinfo, rows, (JDIMENSION)batch);
        if (got == 0) longjmp(err.on_error, 1);
        done += (int32_t)got;
    }
    /* The rows below the rectangle are entropy-decoded but not transformed, and the file is read to its end:
     * a file damaged anywhere fails here (and goes to the full decoder) as it fails a full decode.  The last
     * row is read, not skipped: libjpeg-turbo skips a file's final rows without reading them at all. */
    JDIMENSION remaining = cinfo.output_height - cinfo.output_scanline;
    if (remaining > 1) jpeg_skip_scanlines(&cinfo, remaining - 1);
    if (remaining > 0) {
        JSAMPARRAY last = (*cinfo.mem->alloc_sarray)((j_common_ptr)&cinfo, JPOOL_IMAGE, (JDIMENSION)stride, 1);
        while (cinfo.output_scanline < cinfo.output_height)
            if (jpeg_read_scanlines(&cinfo, last, 1) == 0) longjmp(err.on_error, 1);
    }
    jpeg_finish_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    if (err.warned) return REGION_WARNING;
    /* Pack: row r moves from r * stride + shift to r * width * 3; never forward past a row not yet moved. */
    uint64_t shift = (uint64_t)(left - (int32_t)x) * 3, packed = (uint64_t)width * 3;
    for (int32_t r = 0; r < height; r++) memmove(out + r * packed, out + r * stride + shift, packed);
    return REGION_OK;
}

/* An importable module with no Python functions: the package finds this file through it and loads the C
 * functions above with ctypes, which numba-compiled code can call too. */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpeg_region", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__jpeg_region(void) { return PyModule_Create(&module); }
