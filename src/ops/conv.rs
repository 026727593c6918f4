//! 2-D convolution: on the CPU patch matrices and matrix products, in blocks that
//! stay in cache, with the input and weight gradients beside it; on CUDA cuDNN; on
//! other devices candle's ops, shaped for them.
//!
//! candle's CPU conv2d builds its patch matrix one batch element and one tile at a
//! time with a scalar loop and then runs one small matmul per tile; its
//! conv_transpose2d (the input gradient of a strided convolution) is a direct loop.
//! Here the work is split into tasks of one image's block of output rows (or, for
//! the input gradient, of input channels), each filling its block of the patch
//! matrix with contiguous row copies and multiplying it at once, while it is in
//! the core's L2 cache: the forward `W · patches` is written straight into NCHW,
//! the weight gradient sums `G · patchesᵀ` over the blocks, and the input gradient
//! is `col2im(Wᵀ · G)` per channel block, for every stride. (One patch matrix for
//! the whole batch, as before, was written out to L3 and read back by the product:
//! 2.4 MB at 64 channels of 4 × 16 × 16; the blocked kernels took the tiny bench's
//! SiD iteration from ~600 to ~520 ms on 2 cores.) Images of under 64 output
//! pixels (a UNet's 4 × 4 level) are multiplied in groups of whole images, and
//! output rows shorter than 16 take their patches from a zero-bordered copy of each
//! plane by fixed-size window copies (`zip_window`; col2im likewise), where row by
//! row the copies' set-up cost more than the product. The bias gradient is
//! `reduce::bias_sums`.

use super::dispatch::{self, kernel_cpu_fwd, Kernel};
use super::gemm::{gemm_raw, sum_partials, Mat, SharedDst, MAX_PARTIALS, MIN_SPLIT};
use super::selective::{self, Kind, Operand};
use super::simd::{vectorized, Real};
use super::{contiguous, has_cpu_kernel, PAR_MIN};
use crate::error::Result;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::ops::Range;

/// The shape of one convolution: NCHW input, kernel kh × kw, one stride and padding
/// for both axes, dilation 1, one group.
#[derive(Clone, Copy, Debug)]
pub struct ConvGeom {
    /// Images.
    pub batch: usize,
    /// Input channels.
    pub channels: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Stride of both axes.
    pub stride: usize,
    /// Zero padding of both axes.
    pub padding: usize,
}

impl ConvGeom {
    /// The geometry of convolving `x` (NCHW) by `kernel` (out, in, kh, kw).
    pub fn of(x: &Tensor, kernel: &Tensor, padding: usize, stride: usize) -> candle_core::Result<Self> {
        Self::new(x.dims4()?, kernel.dims4()?, padding, stride)
    }

    /// From the input's NCHW and the kernel's (out, in, kh, kw) dims.
    fn new(
        (batch, channels, h, w): (usize, usize, usize, usize),
        (_, cin, kh, kw): (usize, usize, usize, usize),
        padding: usize,
        stride: usize,
    ) -> candle_core::Result<Self> {
        if cin != channels {
            candle_core::bail!("conv2d: input has {channels} channels, the kernel expects {cin}");
        }
        if h + 2 * padding < kh || w + 2 * padding < kw || stride == 0 {
            candle_core::bail!("conv2d: kernel {kh}×{kw} does not fit a {h}×{w} input with padding {padding}");
        }
        Ok(Self { batch, channels, h, w, kh, kw, stride, padding })
    }

    /// Output height.
    pub fn out_h(&self) -> usize {
        (self.h + 2 * self.padding - self.kh) / self.stride + 1
    }

    /// Output width.
    pub fn out_w(&self) -> usize {
        (self.w + 2 * self.padding - self.kw) / self.stride + 1
    }

    /// Rows of a patch matrix: input channel × kernel tap.
    pub fn rows(&self) -> usize {
        self.channels * self.kh * self.kw
    }

    /// The output columns `[lo, hi)` of a kernel column `j` that read inside the
    /// input (the rest read padding).
    fn valid_x(&self, j: usize) -> (usize, usize) {
        let (s, p) = (self.stride, self.padding);
        // ix = ox·s + j − p must lie in [0, w).
        let lo = if j >= p { 0 } else { (p - j).div_ceil(s) };
        let hi = if self.w + p > j { ((self.w + p - j - 1) / s + 1).min(self.out_w()) } else { 0 };
        (lo, hi.max(lo))
    }

    /// The input row read by output row `oy` at kernel row `i`, if inside.
    fn input_y(&self, oy: usize, i: usize) -> Option<usize> {
        (oy * self.stride + i).checked_sub(self.padding).filter(|&y| y < self.h)
    }
}

/// Rows `rows` of the patch matrix of the output rows `oys` of images `images`
/// alone: `rows.len() × (images.len()·oys.len()·ow)`, each row the images' columns
/// one image after another.
fn patch_block<T: Real>(x: &[T], g: &ConvGeom, images: Range<usize>, oys: Range<usize>, rows: Range<usize>) -> Vec<T> {
    let per_image = oys.len() * g.out_w();
    let n = images.len() * per_image;
    let len = rows.len() * n;
    let mut out = Vec::with_capacity(len);
    let dst = &mut out.spare_capacity_mut()[..len];
    if g.out_w() < SHORT_ROW && !rows.is_empty() && per_image > 0 {
        fill_small_patches(x, g, images, oys, rows, dst);
    } else {
        for (r, row) in rows.zip(dst.chunks_mut(n.max(1))) {
            for (b, part) in images.clone().zip(row.chunks_mut(per_image.max(1))) {
                fill_patch_row(x, g, r, b, oys.clone(), part);
            }
        }
    }
    // Safety: `fill_small_patches` and `fill_patch_row` write every element of
    // every row.
    unsafe { out.set_len(len) };
    out
}

/// Output rows shorter than this take `fill_small_patches`: row by row, a few
/// values per copy, the calls of memmove and memset and the padding tests cost
/// more than the values (a 48-channel 3×3 convolution of 8 × 8 images spent 90%
/// of its forward filling patches).
const SHORT_ROW: usize = 16;

/// `patch_block`'s rows for short output rows: each (image, channel) plane is
/// copied once into a zero-bordered plane, whose taps are then plain strided
/// reads with no padding tests.
fn fill_small_patches<T: Real>(
    x: &[T],
    g: &ConvGeom,
    images: Range<usize>,
    oys: Range<usize>,
    rows: Range<usize>,
    dst: &mut [MaybeUninit<T>],
) {
    let (taps, ow, p, s) = (g.kh * g.kw, g.out_w(), g.padding, g.stride);
    let (pw, per_image) = (g.w + 2 * p, oys.len() * g.out_w());
    let n = images.len() * per_image;
    let mut padded = vec![T::ZERO; (g.h + 2 * p) * pw];
    // Where each tap's first window row starts in the padded plane.
    let tap_at: Vec<usize> = (0..taps).map(|t| (oys.start * s + t / g.kw) * pw + t % g.kw).collect();
    vectorized(
        #[inline(always)]
        || {
            for c in rows.start / taps..rows.end.div_ceil(taps) {
                let channel_taps = rows.start.max(c * taps) - c * taps..rows.end.min((c + 1) * taps) - c * taps;
                for (k, b) in images.clone().enumerate() {
                    let plane = &x[(b * g.channels + c) * g.h * g.w..][..g.h * g.w];
                    zip_window(&mut padded[p * pw + p..], (pw, 1), plane, (g.w, 1), (g.h, g.w), |d, v| *d = v);
                    for tap in channel_taps.clone() {
                        let out = &mut dst[(c * taps + tap - rows.start) * n + k * per_image..][..per_image];
                        zip_window(out, (ow, 1), &padded[tap_at[tap]..], (s * pw, s), (oys.len(), ow), |d, v| {
                            d.write(v);
                        });
                    }
                }
            }
        },
    );
}

/// The output gradients of a group of whole images side by side, `channels ×
/// (images.len()·pixels)`, laid out as `patch_block` lays out the images' patches.
fn gather_images<T: Real>(grad: &[T], images: Range<usize>, channels: usize, pixels: usize) -> Vec<T> {
    // Slice by slice: collecting a chain of flat_maps pushed value by value, ~10 ns
    // a value (as long as the group's whole product for 4 × 4 images).
    let mut out = Vec::with_capacity(channels * images.len() * pixels);
    for c in 0..channels {
        for b in images.clone() {
            out.extend_from_slice(&grad[(b * channels + c) * pixels..][..pixels]);
        }
    }
    out
}

/// `f(d, v)` over a `rows × cols` window of `dst` and one of `src`, each given as
/// (pitch, step): its rows start `pitch` apart and their values lie `step` apart.
/// Dense rows of 4, 8 or 16 (a UNet's deepest levels) go as fixed-size arrays, a
/// vector move each, where a slice copy calls memmove and a loop of a variable
/// count pays its set-up for a handful of values.
#[inline(always)]
fn zip_window<D, S: Copy>(
    dst: &mut [D],
    (dst_pitch, dst_step): (usize, usize),
    src: &[S],
    (src_pitch, src_step): (usize, usize),
    (rows, cols): (usize, usize),
    f: impl Fn(&mut D, S),
) {
    macro_rules! fixed {
        ($($n:literal)*) => {$(
            if cols == $n && dst_step == 1 && src_step == 1 {
                for r in 0..rows {
                    let (d, s) = (&mut dst[r * dst_pitch..][..$n], &src[r * src_pitch..][..$n]);
                    // Both are $n long: the conversions always succeed.
                    if let (Ok(d), Ok(&s)) = (<&mut [D; $n]>::try_from(d), <&[S; $n]>::try_from(s)) {
                        // `s` is a local copy: its loads no longer alias the stores,
                        // so both become vector moves.
                        for (d, v) in d.iter_mut().zip(s) {
                            f(d, v);
                        }
                    }
                }
                return;
            }
        )*};
    }
    fixed!(4 8 16);
    for r in 0..rows {
        let (d, s) = (&mut dst[r * dst_pitch..], &src[r * src_pitch..]);
        for x in 0..cols {
            f(&mut d[x * dst_step], s[x * src_step]);
        }
    }
}

/// Row `r` (input channel × kernel tap) of the patch matrix of image `b`'s output
/// rows `oys`, laid out [output row][output column] in `row`: the input's values,
/// and zeros where the tap reads padding — every element written once, so that
/// the block needs no zero fill first.
#[inline(always)]
fn fill_patch_row<T: Real>(x: &[T], g: &ConvGeom, r: usize, b: usize, oys: Range<usize>, row: &mut [MaybeUninit<T>]) {
    let ow = g.out_w();
    let zero = |d: &mut MaybeUninit<T>| {
        d.write(T::ZERO);
    };
    let (c, i, j) = (r / (g.kh * g.kw), (r / g.kw) % g.kh, r % g.kw);
    let (lo, hi) = g.valid_x(j);
    let plane = &x[(b * g.channels + c) * g.h * g.w..][..g.h * g.w];
    for (oy, dst) in oys.zip(row.chunks_mut(ow)) {
        let Some(iy) = g.input_y(oy, i) else {
            dst.iter_mut().for_each(zero);
            continue;
        };
        let src = &plane[iy * g.w..][..g.w];
        dst[..lo].iter_mut().for_each(zero);
        dst[hi..].iter_mut().for_each(zero);
        if g.stride == 1 {
            let shift = lo + j - g.padding;
            dst[lo..hi].write_copy_of_slice(&src[shift..shift + hi - lo]);
        } else {
            for (ox, d) in dst.iter_mut().enumerate().take(hi).skip(lo) {
                d.write(src[ox * g.stride + j - g.padding]);
            }
        }
    }
}

/// The adjoint of `fill_patch_row` for one (image, channel) plane: the channel's
/// kh·kw patch rows `taps` (each one image's output pixels long, `tap_stride`
/// apart) summed into `plane`.
/// `padded` is scratch space for short output rows, which are summed into a
/// zero-bordered plane first, a whole row per tap and output row with no padding
/// tests (as `fill_small_patches` reads them).
#[inline(always)]
fn col2im_plane<T: Real>(taps: &[T], tap_stride: usize, g: &ConvGeom, plane: &mut [T], padded: &mut Vec<T>) {
    let (oh, ow) = (g.out_h(), g.out_w());
    let n = oh * ow;
    if ow < SHORT_ROW {
        let (p, s, pw) = (g.padding, g.stride, g.w + 2 * g.padding);
        padded.clear();
        padded.resize((g.h + 2 * p) * pw, T::ZERO);
        vectorized(
            #[inline(always)]
            || {
                for (tap, row) in taps.chunks(tap_stride).take(g.kh * g.kw).enumerate() {
                    let at = tap / g.kw * pw + tap % g.kw;
                    zip_window(&mut padded[at..], (s * pw, s), &row[..n], (ow, 1), (oh, ow), |d, v| *d += v);
                }
                zip_window(plane, (g.w, 1), &padded[p * pw + p..], (pw, 1), (g.h, g.w), |d, v| *d += v);
            },
        );
        return;
    }
    for i in 0..g.kh {
        for j in 0..g.kw {
            let row = &taps[(i * g.kw + j) * tap_stride..][..n];
            let (lo, hi) = g.valid_x(j);
            for oy in 0..oh {
                let Some(iy) = g.input_y(oy, i) else { continue };
                let (src, dst) = (&row[oy * ow..][..ow], &mut plane[iy * g.w..][..g.w]);
                if g.stride == 1 {
                    let shift = lo + j - g.padding;
                    for (d, &v) in dst[shift..shift + hi - lo].iter_mut().zip(&src[lo..hi]) {
                        *d += v;
                    }
                } else {
                    for (ox, &v) in src.iter().enumerate().take(hi).skip(lo) {
                        let d = &mut dst[ox * g.stride + j - g.padding];
                        *d += v;
                    }
                }
            }
        }
    }
}

/// Most bytes of one task's patch block in the blocked kernels: the block stays in
/// the core's L2 cache from im2col writing it to the product reading it, where the
/// whole batch's patch matrix (2.4 MB at 64 channels, 4 × 16 × 16) went out to L3
/// and back.
const PATCH_BLOCK_BYTES: usize = 512 << 10;

/// Fewest output columns of one task's product in the blocked kernels: narrower
/// products run far below gemm's speed (a 320 × 2880 kernel by 16 columns).
const MIN_BLOCK_COLS: usize = 64;

/// Columns a group of whole small images aims at: 128 ran best for 4 × 4 images
/// (8 of them, 96 and 192 channels, 3×3: 254 → 196 and 464 → 359 µs on 2 cores,
/// PyTorch 161 and 246; 64 and 256 columns were slower).
const GROUP_COLS: usize = 128;

/// The threads a blocked kernel of `work` multiply-adds shares its tasks among:
/// one for small convolutions (about a million multiply-adds; their tasks then
/// run in turn on the calling thread).
fn threads_for(work: usize) -> usize {
    if work < PAR_MIN * 64 {
        1
    } else {
        rayon::current_num_threads()
    }
}

/// Runs `task` for 0..tasks, in parallel when `threads` > 1.
fn run_tasks(tasks: usize, threads: usize, task: impl Fn(usize) + Send + Sync) {
    if threads > 1 {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
}

/// How the forward and the weight gradient split the output into tasks: each
/// image's output rows into blocks, a task being (image, block); or, where a whole
/// image has fewer than `MIN_BLOCK_COLS` output pixels (4 × 4 at a UNet's deepest
/// level), the batch into groups of whole images, a task being a group, so that
/// its product stays wide (a 4 × 4 image's 16 columns ran at half of gemm's speed:
/// a 96-channel 3×3 convolution of 8 such images took 1.6× PyTorch's time).
#[derive(Clone, Copy)]
struct RowBlocks {
    /// Output rows per block (the last block may have fewer).
    rows: usize,
    /// Blocks per image.
    blocks: usize,
    /// Output rows per image.
    oh: usize,
    /// Images per task (1 unless whole images are grouped; the last group may have
    /// fewer).
    images: usize,
    /// Images in all.
    batch: usize,
}

impl RowBlocks {
    /// Blocks small enough for `PATCH_BLOCK_BYTES` at `row_bytes` bytes of patches
    /// per output row but at least `MIN_BLOCK_COLS` wide, and two per thread over
    /// the batch where there are rows enough, so that shares even out.
    fn new(g: &ConvGeom, row_bytes: usize, threads: usize) -> Self {
        let (oh, ow) = (g.out_h().max(1), g.out_w().max(1));
        if oh * ow < MIN_BLOCK_COLS && g.batch > 1 {
            // Enough images for a wide product, but a group per thread at least, and
            // patches within PATCH_BLOCK_BYTES.
            let images = GROUP_COLS
                .div_ceil(oh * ow)
                .min(g.batch.div_ceil(threads.max(1)))
                .min(PATCH_BLOCK_BYTES / (oh * row_bytes).max(1))
                .max(1);
            return Self { rows: oh, blocks: 1, oh: g.out_h(), images, batch: g.batch };
        }
        let per_image = (2 * threads).div_ceil(g.batch.max(1));
        let widest = (PATCH_BLOCK_BYTES / row_bytes.max(1)).min(oh.div_ceil(per_image));
        let rows = widest.max(MIN_BLOCK_COLS.div_ceil(ow)).clamp(1, oh);
        // Blocks of equal height, not a full set and a remainder.
        let blocks = oh.div_ceil(rows);
        Self { rows: oh.div_ceil(blocks), blocks, oh: g.out_h(), images: 1, batch: g.batch }
    }

    /// How many tasks there are.
    fn tasks(&self) -> usize {
        self.batch.div_ceil(self.images) * self.blocks
    }

    /// Task t's images and output rows (tasks run over images, then blocks).
    fn task(&self, t: usize) -> (Range<usize>, Range<usize>) {
        let (block, first) = (t % self.blocks, t / self.blocks * self.images);
        (first..(first + self.images).min(self.batch), block * self.rows..((block + 1) * self.rows).min(self.oh))
    }
}

/// conv2d(x, w) (+ b) into NCHW, one task per (image, block of output rows): the
/// block's patches, then W · patches written straight into the image's output
/// (its `[cout, pixels]` is the product's row-major layout), then the bias; a task
/// of several small images multiplies them at once and then copies each image's
/// rows out.
struct ConvForward(ConvGeom);

impl Kernel for ConvForward {
    const NAME: &'static str = "conv2d";
    fn run<T: Real>(&self, ops: &[(&[T], &Layout)]) -> candle_core::Result<(Vec<T>, Shape)> {
        let &[(x, xl), (w, wl), ref bias @ ..] = ops else { candle_core::bail!("conv2d: x, w and the bias") };
        let (g, cout) = (&self.0, wl.dims()[0]);
        let (x, w) = (contiguous(x, xl)?, contiguous(w, wl)?);
        let bias = match bias.first() {
            Some(&(b, bl)) => Some(contiguous(b, bl)?),
            None => None,
        };
        let (ow, pixels, k) = (g.out_w(), g.out_h() * g.out_w(), g.rows());
        let len = g.batch * cout * pixels;
        let shape = Shape::from((g.batch, cout, g.out_h(), ow));
        if k == 0 || len == 0 {
            let mut out = vec![T::ZERO; len];
            if let Some(bias) = bias {
                out.chunks_mut(pixels.max(1)).enumerate().for_each(|(p, o)| o.fill(bias[p % cout]));
            }
            return Ok((out, shape));
        }
        let mut out = Vec::with_capacity(len);
        let dst = SharedDst(out.spare_capacity_mut().as_mut_ptr().cast::<T>());
        let threads = threads_for(len * k);
        let row_blocks = RowBlocks::new(g, k * ow * std::mem::size_of::<T>(), threads);
        let tasks = row_blocks.tasks();
        // Too few blocks for the threads (one small image): the output channels are
        // split too, each task making its block's patches itself.
        let channel_step = cout.div_ceil(threads.div_ceil(tasks)).next_multiple_of(16).min(cout);
        let channel_blocks = cout.div_ceil(channel_step);
        let task = |t: usize| {
            let ((images, oys), c0) = (row_blocks.task(t / channel_blocks), t % channel_blocks * channel_step);
            let (n, channels) = (images.len() * oys.len() * ow, c0..(c0 + channel_step).min(cout));
            let patches = patch_block(x, g, images.clone(), oys.clone(), 0..k);
            let (w_rows, patches) = (Mat::dense(w, cout, k).rows(c0, channels.len()), Mat::dense(&patches, k, n));
            let bias_of = |c: usize| bias.map_or(T::ZERO, |bias| bias[c]);
            if images.len() > 1 {
                // Whole images (row_blocks groups only those): the product, then each
                // image's rows with the bias, into their places.
                let mut y: Vec<T> = Vec::with_capacity(channels.len() * n);
                // Safety: `y` has capacity for the channels × n outputs, which gemm
                // (read_dst off) writes all of.
                unsafe {
                    gemm_raw(
                        y.spare_capacity_mut().as_mut_ptr().cast::<T>(),
                        n,
                        w_rows,
                        patches,
                        T::from_usize(1),
                        false,
                        Parallelism::None,
                    );
                    y.set_len(channels.len() * n);
                }
                for (i, b) in images.enumerate() {
                    for (j, c) in channels.clone().enumerate() {
                        // Safety: task t alone writes image b's output channels
                        // `channels`, inside the vector's capacity.
                        let row: &mut [MaybeUninit<T>] = unsafe {
                            std::slice::from_raw_parts_mut(dst.ptr().add((b * cout + c) * pixels).cast(), pixels)
                        };
                        let (src, bc) = (&y[j * n + i * pixels..][..pixels], bias_of(c));
                        vectorized(
                            #[inline(always)]
                            || {
                                for (d, &v) in row.iter_mut().zip(src) {
                                    d.write(v + bc);
                                }
                            },
                        );
                    }
                }
                return;
            }
            let at = (images.start * cout + c0) * pixels + oys.start * ow;
            // Safety: task t alone writes image b's output channels `channels` at the
            // columns of rows `oys` (n each, at row stride `pixels`), inside the
            // vector's capacity.
            unsafe { gemm_raw(dst.ptr().add(at), pixels, w_rows, patches, T::from_usize(1), false, Parallelism::None) };
            if bias.is_some() {
                for (j, c) in channels.enumerate() {
                    // Safety: as above; gemm has written these n outputs.
                    let row = unsafe { std::slice::from_raw_parts_mut(dst.ptr().add(at + j * pixels), n) };
                    let bc = bias_of(c);
                    vectorized(
                        #[inline(always)]
                        || row.iter_mut().for_each(|v| *v += bc),
                    );
                }
            }
        };
        run_tasks(tasks * channel_blocks, threads, task);
        // Safety: the tasks cover every image and output row: gemm (read_dst off)
        // wrote all `len` outputs.
        unsafe { out.set_len(len) };
        Ok((out, shape))
    }
}

/// conv2d(x, w) (+ b) on the CPU (see `ConvForward`).
pub(super) fn cpu_forward(
    x: Operand,
    w: Operand,
    bias: Option<Operand>,
    padding: usize,
    stride: usize,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let g = ConvGeom::new(x.1.shape().dims4()?, w.1.shape().dims4()?, padding, stride)?;
    let mut operands = vec![x, w];
    operands.extend(bias);
    dispatch::cpu(&ConvForward(g), &operands)
}

/// d conv2d / d x for the output gradient `grad` (NCHW), one task per (image, block
/// of input channels): the block's rows of Wᵀ · G_b (channel × kernel tap by
/// output pixel), then summed into the block's planes (col2im) while they are in
/// cache — the whole batch's Wᵀ · G is not formed. Images of fewer than
/// `MIN_BLOCK_COLS` output pixels go in groups (as in the forward): a task's
/// product takes the group's gradients side by side.
struct ConvInputGrad(ConvGeom);

impl Kernel for ConvInputGrad {
    const NAME: &'static str = "conv2d-input-grad";
    fn run<T: Real>(&self, ops: &[(&[T], &Layout)]) -> candle_core::Result<(Vec<T>, Shape)> {
        let &[(grad, gl), (w, wl)] = ops else { candle_core::bail!("conv2d-input-grad: grad and w") };
        let (g, cout) = (&self.0, wl.dims()[0]);
        let (grad, w) = (contiguous(grad, gl)?, contiguous(w, wl)?);
        let (taps, pixels, plane) = (g.kh * g.kw, g.out_h() * g.out_w(), g.h * g.w);
        let len = g.batch * g.channels * plane;
        let shape = Shape::from((g.batch, g.channels, g.h, g.w));
        if cout == 0 || pixels == 0 || len == 0 {
            return Ok((vec![T::ZERO; len], shape));
        }
        let threads = threads_for(len * cout * taps);
        // Images per task: a group wide enough for gemm where images are small, but
        // a group per thread at least.
        let images = if pixels < MIN_BLOCK_COLS && g.batch > 1 {
            GROUP_COLS.div_ceil(pixels).min(g.batch.div_ceil(threads)).max(1)
        } else {
            1
        };
        let (groups, n) = (g.batch.div_ceil(images), images * pixels);
        // Channel blocks within PATCH_BLOCK_BYTES, two per thread over the groups.
        let by_cache = PATCH_BLOCK_BYTES / (taps * n * std::mem::size_of::<T>()).max(1);
        let per_group = (2 * threads).div_ceil(groups);
        let step = by_cache.min(g.channels.div_ceil(per_group)).clamp(1, g.channels);
        let blocks = g.channels.div_ceil(step);
        let mut out = Vec::with_capacity(len);
        let dst = SharedDst(out.spare_capacity_mut().as_mut_ptr().cast::<T>());
        let wt = Mat::dense(w, cout, g.channels * taps).t();
        let task = |t: usize| {
            let (first, c0) = (t / blocks * images, t % blocks * step);
            let group = first..(first + images).min(g.batch);
            let (channels, n) = (step.min(g.channels - c0), group.len() * pixels);
            let rows = channels * taps;
            // A group: the images' gradients side by side (cout × n).
            let grouped: Vec<T>;
            let gb = if group.len() > 1 {
                grouped = gather_images(grad, group.clone(), cout, pixels);
                Mat::dense(&grouped, cout, n)
            } else {
                Mat::dense(&grad[first * cout * pixels..], cout, pixels)
            };
            let mut cols = Vec::with_capacity(rows * n);
            // Safety: `cols` has capacity for the rows × n outputs, which gemm
            // (read_dst off) writes all of.
            unsafe {
                gemm_raw(
                    cols.spare_capacity_mut().as_mut_ptr().cast::<T>(),
                    n,
                    wt.rows(c0 * taps, rows),
                    gb,
                    T::from_usize(1),
                    false,
                    Parallelism::None,
                );
                cols.set_len(rows * n);
            }
            let mut padded = Vec::new();
            for (i, b) in group.enumerate() {
                // Safety: task t alone writes image b's planes c0..c0 + channels,
                // inside the vector's capacity; zero bits are 0.0 in f32 and f64.
                let planes = unsafe {
                    let at = dst.ptr().add((b * g.channels + c0) * plane);
                    std::ptr::write_bytes(at, 0, channels * plane);
                    std::slice::from_raw_parts_mut(at, channels * plane)
                };
                for (c, plane) in planes.chunks_mut(plane).enumerate() {
                    col2im_plane(&cols[c * taps * n + i * pixels..], n, g, plane, &mut padded);
                }
            }
        };
        run_tasks(groups * blocks, threads, task);
        // Safety: the tasks cover every image and channel.
        unsafe { out.set_len(len) };
        Ok((out, shape))
    }
}

impl CustomOp2 for ConvInputGrad {
    fn name(&self) -> &'static str {
        Self::NAME
    }
    kernel_cpu_fwd!(s1 l1, s2 l2);
}

/// d conv2d / d x for the output gradient `grad` ([B, C_out, H_out, W_out]).
pub fn input_grad(grad: &Tensor, w: &Tensor, g: &ConvGeom) -> candle_core::Result<Tensor> {
    // The kernels read dense operands (a gradient can arrive as a strided view).
    grad.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &ConvInputGrad(*g))
}

/// d conv2d / d w for the output gradient `grad` (NCHW): Σ G_t · patches_tᵀ over
/// the forward's tasks t (image, block of output rows), each block's patches made
/// where they are multiplied. With a long reduction (batch × pixels) the threads
/// split the tasks, each summing its own partial result, and the partials are then
/// added in order (a fixed order for a given thread count); otherwise they split
/// the columns (input channel × tap), each making those rows of every task's
/// patches — no partials, no patches made twice.
struct ConvWeightGrad(ConvGeom);

impl Kernel for ConvWeightGrad {
    const NAME: &'static str = "conv2d-weight-grad";
    fn run<T: Real>(&self, ops: &[(&[T], &Layout)]) -> candle_core::Result<(Vec<T>, Shape)> {
        let &[(x, xl), (grad, gl)] = ops else { candle_core::bail!("conv2d-weight-grad: x and grad") };
        let g = &self.0;
        let (x, grad) = (contiguous(x, xl)?, contiguous(grad, gl)?);
        let (ow, pixels, k) = (g.out_w(), g.out_h() * g.out_w(), g.rows());
        let cout = grad.len() / (g.batch * pixels).max(1);
        let shape = Shape::from((cout, g.channels, g.kh, g.kw));
        if cout * k == 0 || g.batch * pixels == 0 {
            return Ok((vec![T::ZERO; cout * k], shape));
        }
        let threads = threads_for(cout * k * g.batch * pixels);
        let row_blocks = RowBlocks::new(g, k * ow * std::mem::size_of::<T>(), threads);
        let tasks = row_blocks.tasks();
        let by_tasks =
            tasks >= threads && g.batch * pixels >= threads * MIN_SPLIT && threads * cout * k <= MAX_PARTIALS;
        let column_step = if by_tasks { k } else { k.div_ceil(threads).next_multiple_of(16).min(k) };
        let parts = if by_tasks { threads } else { k.div_ceil(column_step) };
        // Part p: Σ over its tasks of G_t · patches_t[its columns]ᵀ into `dst`
        // (cout rows at row stride k).
        let part = |p: usize, dst: *mut T| {
            let (ts, k0) = if by_tasks {
                // Shares that differ by one task at most: none is empty (parts ≤ tasks).
                (p * tasks / parts..(p + 1) * tasks / parts, 0)
            } else {
                (0..tasks, p * column_step)
            };
            let columns = k0..(k0 + column_step).min(k);
            for (i, t) in ts.enumerate() {
                let (images, oys) = row_blocks.task(t);
                let n = images.len() * oys.len() * ow;
                let patches = patch_block(x, g, images.clone(), oys.clone(), columns.clone());
                // A group of whole images: their gradients side by side, as their patches.
                let grouped: Vec<T>;
                let gt = if images.len() > 1 {
                    grouped = gather_images(grad, images.clone(), cout, pixels);
                    Mat::dense(&grouped, cout, n)
                } else {
                    Mat::new(&grad[images.start * cout * pixels + oys.start * ow..], cout, n, pixels, 1)
                };
                let pt = Mat::dense(&patches, columns.len(), n).t();
                // Safety: `dst` holds this part's cout × columns outputs (row stride
                // k) and no other part's; its first task writes them, the others add.
                unsafe { gemm_raw(dst, k, gt, pt, T::from_usize(1), i > 0, Parallelism::None) };
            }
        };
        if !by_tasks {
            let mut out = Vec::with_capacity(cout * k);
            let shared = SharedDst(out.spare_capacity_mut().as_mut_ptr().cast::<T>());
            // Safety: part p writes columns p·column_step.. of the outputs, no other
            // part's.
            run_tasks(parts, threads, |p| part(p, unsafe { shared.ptr().add(p * column_step) }));
            // Safety: the parts cover every column, each written by its first task.
            unsafe { out.set_len(cout * k) };
            return Ok((out, shape));
        }
        let partials = (0..parts)
            .into_par_iter()
            .map(|p| {
                let mut partial = Vec::with_capacity(cout * k);
                part(p, partial.spare_capacity_mut().as_mut_ptr().cast::<T>());
                // Safety: every part has a task (parts ≤ tasks), whose product wrote
                // all cout × k outputs.
                unsafe { partial.set_len(cout * k) };
                partial
            })
            .collect();
        Ok((sum_partials(partials, k), shape))
    }
}

impl CustomOp2 for ConvWeightGrad {
    fn name(&self) -> &'static str {
        Self::NAME
    }
    kernel_cpu_fwd!(s1 l1, s2 l2);
}

/// d conv2d / d w for the output gradient `grad` ([B, C_out, H_out, W_out]).
pub fn weight_grad(grad: &Tensor, x: &Tensor, g: &ConvGeom) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &ConvWeightGrad(*g))
}

/// d conv2d / d x for the output gradient `g` with candle's ops, for devices without
/// the patch-matrix kernels; `x_hw` is the input's height and width. Stride 1 with a
/// square kernel is a convolution of `g` by the kernel transposed and flipped
/// (candle's CUDA conv2d is a matrix product; its conv_transpose2d a direct loop per
/// output element); otherwise candle's transposed convolution, fitted to the input.
pub fn input_grad_composed(
    g: &Tensor,
    w: &Tensor,
    x_hw: (usize, usize),
    padding: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    let (kh, kw) = (w.dim(2)?, w.dim(3)?);
    if stride == 1 && kh == kw && padding < kh {
        let reversed = Tensor::new((0..kh as u32).rev().collect::<Vec<_>>(), w.device())?;
        let flipped = w.transpose(0, 1)?.contiguous()?.index_select(&reversed, 2)?.index_select(&reversed, 3)?;
        return g.conv2d(&flipped, kh - 1 - padding, 1, 1, 1);
    }
    let out_size = (g.dim(2)? - 1) * stride + kh - 2 * padding;
    let gx = g.conv_transpose2d(w, padding, x_hw.0 - out_size, stride, 1)?;
    // conv_transpose2d takes one output padding, fitted to the height; fit the
    // width (non-square kernels or inputs) by trimming or padding.
    let (want, got) = (x_hw.1, gx.dim(3)?);
    Ok(if got > want {
        gx.narrow(3, 0, want)?
    } else if got < want {
        gx.pad_with_zeros(3, 0, want - got)?
    } else {
        gx
    })
}

/// The input and weight gradients of conv2d(x, w) for the output gradient `g`,
/// each only when it is needed.
pub(super) fn grads(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    padding: usize,
    stride: usize,
    need_x: bool,
    need_w: bool,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
    if has_cpu_kernel(g) {
        let geom = ConvGeom::of(x, w, padding, stride)?;
        let gx = if need_x { Some(input_grad(g, &w.detach(), &geom)?) } else { None };
        let gw = if need_w { Some(weight_grad(g, &x.detach(), &geom)?) } else { None };
        return Ok((gx, gw));
    }
    #[cfg(feature = "cudnn")]
    if g.device().is_cuda() {
        let gx = match need_x {
            true => Some(super::cudnn::input_grad(g, &w.detach(), x.dims(), padding, stride)?),
            false => None,
        };
        let gw = match need_w {
            true => Some(super::cudnn::weight_grad(&x.detach(), g, w.dims(), padding, stride)?),
            false => None,
        };
        return Ok((gx, gw));
    }
    // Other devices: candle's ops (see input_grad_composed), and a convolution of
    // the input by the output gradient (the stride becomes a dilation).
    let (kh, kw) = (w.dim(2)?, w.dim(3)?);
    let gx =
        if need_x { Some(input_grad_composed(g, &w.detach(), (x.dim(2)?, x.dim(3)?), padding, stride)?) } else { None };
    let gw = if need_w {
        let gk = x.detach().transpose(0, 1)?.conv2d(&g.transpose(0, 1)?, padding, 1, stride, 1)?.transpose(0, 1)?;
        Some(if gk.dim(2)? != kh || gk.dim(3)? != kw { gk.narrow(2, 0, kh)?.narrow(3, 0, kw)? } else { gk })
    } else {
        None
    };
    Ok((gx, gw))
}

/// y = conv2d(x, w) (+ b per channel), with a backward that skips gradients nobody
/// needs (see `selective`).
///
/// # Shapes
/// - x: `[B, C_in, H, W]`, w: `[C_out, C_in, kh, kw]`, b: `[C_out]`;
///   the output is `[B, C_out, H_out, W_out]`.
pub fn conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, padding: usize, stride: usize) -> Result<Tensor> {
    crate::profile::span("conv.forward", x.device(), || {
        selective::apply(Kind::Conv { padding, stride }, x, w, b, |x, w, b| {
            // On CUDA the forward is computed off the graph (selective's backward applies).
            #[cfg(feature = "cudnn")]
            if x.device().is_cuda() {
                return with_bias(super::cudnn::forward(x, w, padding, stride)?, b);
            }
            conv2d_composed(x, w, b, padding, stride)
        })
    })
}

/// `conv2d` from candle's ops and candle's backward: the form devices without a
/// kernel run, and the test oracle.
pub fn conv2d_composed(x: &Tensor, w: &Tensor, b: Option<&Tensor>, padding: usize, stride: usize) -> Result<Tensor> {
    with_bias(x.conv2d(w, padding, stride, 1, 1)?, b)
}

/// y + b per channel (NCHW).
fn with_bias(y: Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    Ok(match b {
        Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?,
        None => y,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::max_diff;
    use candle_core::{DType, Device};

    /// The patch-matrix convolution equals candle's conv2d, and its input gradient
    /// is its adjoint (⟨conv(x), g⟩ = ⟨x, input_grad(g)⟩), for odd shapes, strides
    /// and paddings, with output rows shorter than `SHORT_ROW` and longer.
    #[test]
    fn matches_candle_conv2d() -> Result<()> {
        let dev = Device::Cpu;
        for &(b, c, h, w, cout, kh, kw, s, p) in &[
            (2, 3, 7, 5, 4, 3, 3, 1, 1),
            (1, 2, 8, 8, 3, 3, 3, 2, 1),
            (3, 4, 5, 6, 2, 1, 1, 1, 0),
            (2, 1, 2, 3, 1, 3, 2, 1, 1),
            (1, 3, 9, 7, 2, 3, 3, 2, 0),
            (2, 2, 4, 4, 3, 4, 4, 2, 2),
            (1, 2, 5, 37, 3, 3, 3, 2, 0),
            (1, 2, 3, 20, 2, 1, 3, 1, 1),
        ] {
            let x = Tensor::randn(0f64, 1., (b, c, h, w), &dev)?;
            let k = Tensor::randn(0f64, 1., (cout, c, kh, kw), &dev)?;
            let g = ConvGeom::of(&x, &k, p, s)?;
            let ours = conv2d(&x, &k, None, p, s)?;
            let theirs = conv2d_composed(&x, &k, None, p, s)?;
            assert_eq!(ours.dims(), theirs.dims());
            let err = max_diff(&ours, &theirs)?;
            assert!(err < 1e-10, "conv {b}x{c}x{h}x{w} k{kh}x{kw} s{s} p{p}: {err}");

            let probe = Tensor::randn(0f64, 1., ours.shape(), &dev)?;
            let lhs = (&ours * &probe)?.sum_all()?.to_scalar::<f64>()?;
            let rhs = (&x * input_grad(&probe, &k, &g)?)?.sum_all()?.to_scalar::<f64>()?;
            assert!((lhs - rhs).abs() < 1e-9 * lhs.abs().max(1.0), "adjoint: {lhs} vs {rhs}");
        }
        let x32 = Tensor::randn(0f32, 1., (2, 3, 6, 6), &dev)?;
        let k32 = Tensor::randn(0f32, 1., (5, 3, 3, 3), &dev)?;
        let b32 = Tensor::randn(0f32, 1., 5, &dev)?;
        let ours = conv2d(&x32, &k32, Some(&b32), 1, 1)?;
        let theirs = conv2d_composed(&x32, &k32, Some(&b32), 1, 1)?;
        assert_eq!(ours.dtype(), DType::F32);
        assert!(max_diff(&ours, &theirs)? < 1e-4, "f32 with bias");
        Ok(())
    }

    /// The blocked kernels equal candle's conv2d and its gradients however they split
    /// the work: on three threads, one image in row blocks (weight gradient split by
    /// tasks: six, and four, uneven among three parts), one small image split by
    /// output channels (forward) and by columns (weight gradient), a strided batch
    /// of two, and batches of small images in groups of whole images: seven 4 × 4
    /// images in groups of three, three and one (weight gradient split by columns),
    /// sixty in groups of eight and a last of four (weight gradient split by tasks),
    /// and five strided 3 × 2 outputs in groups of two, two and one.
    #[test]
    fn blocked_kernels_equal_candle_for_every_split() -> Result<()> {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().map_err(candle_core::Error::wrap)?;
        pool.install(|| -> Result<()> {
            let dev = Device::Cpu;
            for &(b, c, (h, w), cout, s) in &[
                (1, 3, (40, 40), 40, 1),
                (1, 4, (8, 100), 48, 1),
                (1, 48, (8, 8), 48, 1),
                (2, 16, (24, 24), 32, 2),
                (7, 64, (4, 4), 64, 1),
                (60, 8, (4, 4), 16, 1),
                (5, 48, (5, 3), 96, 2),
            ] {
                let x = candle_core::Var::randn(0f64, 1., (b, c, h, w), &dev)?;
                let w = candle_core::Var::randn(0f64, 1., (cout, c, 3, 3), &dev)?;
                let bias = candle_core::Var::randn(0f64, 1., cout, &dev)?;
                let ours = conv2d(&x, &w, Some(&bias), 1, s)?;
                let theirs = conv2d_composed(&x, &w, Some(&bias), 1, s)?;
                let case = format!("{b}×{c}×{h}×{w} → {cout}, stride {s}");
                assert!(max_diff(&ours, &theirs)? < 1e-10, "{case}: forward");
                let probe = Tensor::randn(0f64, 1., ours.shape(), &dev)?;
                let (g_ours, g_theirs) =
                    ((&ours * &probe)?.sum_all()?.backward()?, (&theirs * &probe)?.sum_all()?.backward()?);
                for (name, v) in [("x", &x), ("w", &w), ("bias", &bias)] {
                    let (a, e) = (g_ours.get(v).expect("gradient"), g_theirs.get(v).expect("gradient"));
                    assert!(max_diff(a, e)? < 1e-9, "{case}: gradient of {name}");
                }
            }
            Ok(())
        })
    }

    /// A gradient (or input) that arrives as a strided view gives the gradients its
    /// dense copy gives.
    #[test]
    fn strided_operands_give_the_dense_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f64, 1., (2, 3, 6, 5), &dev)?;
        let k = Tensor::randn(0f64, 1., (4, 3, 3, 3), &dev)?;
        let geom = ConvGeom::of(&x, &k, 1, 1)?;
        let g = Tensor::randn(0f64, 1., (2, 4, 6, 5), &dev)?;
        // The same values in a transposed layout.
        let strided = |t: &Tensor| -> Result<Tensor> { Ok(t.transpose(2, 3)?.contiguous()?.transpose(2, 3)?) };
        assert!(!strided(&g)?.is_contiguous());
        let dx = max_diff(&input_grad(&strided(&g)?, &k, &geom)?, &input_grad(&g, &k, &geom)?)?;
        let dw = max_diff(&weight_grad(&strided(&g)?, &strided(&x)?, &geom)?, &weight_grad(&g, &x, &geom)?)?;
        assert!(dx == 0.0 && dw == 0.0, "dx {dx}, dw {dw}");
        Ok(())
    }

    /// The input gradient from candle's ops (what CUDA runs) equals the patch-matrix
    /// one, for stride 1 (the flipped-kernel convolution) and the fallbacks.
    #[test]
    fn input_grad_by_candle_ops_equals_col2im() -> Result<()> {
        let dev = Device::Cpu;
        for &(b, c, h, w, cout, k, s, p) in
            &[(2, 3, 7, 5, 4, 3, 1, 1), (1, 2, 6, 6, 3, 1, 1, 0), (2, 2, 5, 7, 3, 3, 1, 0), (1, 3, 8, 8, 2, 3, 2, 1)]
        {
            let x = Tensor::randn(0f64, 1., (b, c, h, w), &dev)?;
            let kernel = Tensor::randn(0f64, 1., (cout, c, k, k), &dev)?;
            let geom = ConvGeom::of(&x, &kernel, p, s)?;
            let g = Tensor::randn(0f64, 1., (b, cout, geom.out_h(), geom.out_w()), &dev)?;
            let want = input_grad(&g, &kernel, &geom)?;
            let got = input_grad_composed(&g, &kernel, (h, w), p, s)?;
            assert_eq!(got.dims(), want.dims(), "case {:?}", (b, c, h, w, cout, k, s, p));
            assert!(max_diff(&got, &want)? < 1e-10, "case {:?}", (b, c, h, w, cout, k, s, p));
        }
        Ok(())
    }
}
