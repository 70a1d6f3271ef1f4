//! The AMX micro-kernels: bf16 pairs on `tdpbf16ps` tiles ([`Amx`], the hardware) and the same blocking over
//! a scalar model of the tile instructions ([`AmxEmulated`], for tests on any CPU).
//!
//! One blocked product, [`tile_gemm`], is written once against [`Tiles`] (configure, zero, load, dot,
//! store), so the emulated backend runs exactly the blocking, remainders and configuration the hardware
//! runs. The operands need no repacking: B's `[k/2][ldb][2]` pairs are the layout `tdpbf16ps` reads as its
//! second source (16 pair-rows of 16 columns = one 64-byte tile row), and A's rows of pairs are its first.
//!
//! Blocking: 2×2 C tiles of 16 rows × 16 f32 columns (tmm0..3), two A tiles (tmm4, tmm5) and two B tiles
//! (tmm6, tmm7), k in steps of 16 pairs (32 bf16). Rows past `m` are left out by configuring fewer tile rows;
//! a k remainder is copied into zero-padded scratch so every tile keeps the full 64-byte k width.
//!
//! Tile state lives only inside one [`tile_gemm`] call: it configures on entry and releases on exit, so
//! no configuration is shared between calls, threads, or another library using AMX on the same thread.

use super::{Kern, bf16_bits};
use crate::tensor::{DType, Float};

/// Rows of a tile, f32 columns of a C tile, and pairs (32-bit units) of k in one A/B tile row.
const TR: usize = 16;
const TN: usize = 16;
const TK: usize = 16;
/// Bytes in one tile row (every tile here is configured this wide).
const ROW_BYTES: usize = 64;

/// Tile register roles.
const C: [[u8; 2]; 2] = [[0, 1], [2, 3]];
const A: [u8; 2] = [4, 5];
const B: [u8; 2] = [6, 7];

/// The 64-byte operand of `ldtilecfg` (palette 1).
#[repr(C, align(64))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    /// Bytes per row of each tile.
    colsb: [u16; 16],
    /// Rows of each tile.
    rows: [u8; 16],
}

impl TileConfig {
    /// The configuration of one row block: C and A tiles of row tile `i` get `rows[i]` rows (0 = unused),
    /// B tiles 16 pair-rows; every used tile is 64 bytes wide.
    fn for_rows(rows: [usize; 2]) -> TileConfig {
        let mut cfg = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        let mut set = |t: u8, r: usize| {
            cfg.rows[t as usize] = r as u8;
            cfg.colsb[t as usize] = if r > 0 { ROW_BYTES as u16 } else { 0 };
        };
        for (i, &r) in rows.iter().enumerate() {
            set(C[i][0], r);
            set(C[i][1], r);
            set(A[i], r);
        }
        set(B[0], TK);
        set(B[1], TK);
        cfg
    }
}

/// The tile instructions [`tile_gemm`] uses. Tile numbers are const generics because the hardware encodes
/// them in the instruction.
pub(crate) trait Tiles {
    /// `ldtilecfg`: sets every tile's shape and zeroes all tiles.
    ///
    /// # Safety
    /// The CPU must run AMX and the OS must have granted this process tile data ([`crate::isa::Amx::Ready`]).
    unsafe fn configure(&mut self, cfg: &TileConfig);
    /// `tilezero`.
    unsafe fn zero<const T: u8>(&mut self);
    /// `tileloadd`: tile `T`'s configured rows, each its configured bytes, from `src + row * stride`.
    ///
    /// # Safety
    /// Those bytes must be readable.
    unsafe fn load<const T: u8>(&mut self, src: *const u8, stride: usize);
    /// `tilestored`: the reverse of [`Tiles::load`].
    ///
    /// # Safety
    /// Those bytes must be writable.
    unsafe fn store<const T: u8>(&mut self, dst: *mut u8, stride: usize);
    /// `tdpbf16ps`: `tile CT += tile AT · tile BT` (bf16 pairs, f32 accumulation).
    unsafe fn dot<const CT: u8, const AT: u8, const BT: u8>(&mut self);
    /// `tilerelease`: back to the init state.
    unsafe fn release(&mut self);
}

/// Dispatches a runtime tile pair index to the const-generic tile instructions.
macro_rules! on_tile {
    ($u:ident.$f:ident, $roles:expr, $i:expr $(, $arg:expr)*) => {
        match $i {
            0 => $u.$f::<{ $roles[0] }>($($arg),*),
            _ => $u.$f::<{ $roles[1] }>($($arg),*),
        }
    };
}

/// `C[m×n] (+)= A·B` on tiles: see the module docs for the blocking and [`Kern::gemm`] for the operands.
///
/// # Safety
/// [`Kern::gemm`]'s, plus [`Tiles::configure`]'s (the CPU and OS run `U`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_gemm<U: Tiles>(
    u: &mut U,
    m: usize,
    n: usize,
    kp: usize,
    a: *const u16,
    lda: usize,
    b: *const u16,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let k_full = kp / TK * TK;
    let k_tail = kp - k_full;
    // The k remainder of A (2 row tiles) and of B (2 column tiles), zero-padded to a full tile width.
    let mut a_tail = [0u32; 2 * TR * TK];
    let mut b_tail = [0u32; TK * 2 * TN];
    let mut configured: Option<[usize; 2]> = None;
    // SAFETY: (whole body) every tile read or written lies inside the caller's ranges: a row tile covers rows
    // i0 + 16i .. + rows[i] < m of A and C, a column tile columns j0 + 16j .. + 16 <= n of B and C, a k step
    // pairs p0 .. p0 + 16 <= k_full of A and B; the tails come from the scratch arrays above. The caller
    // promises the CPU and OS run `U`.
    unsafe {
        let mut i0 = 0;
        while i0 < m {
            let rows = [(m - i0).min(TR), (m - i0).saturating_sub(TR).min(TR)];
            if configured != Some(rows) {
                u.configure(&TileConfig::for_rows(rows));
                configured = Some(rows);
            }
            let row_tiles = 1 + (rows[1] > 0) as usize;
            if k_tail > 0 {
                for r in 0..rows[0] + rows[1] {
                    let src = a.add((i0 + r) * lda + 2 * k_full).cast::<u32>();
                    for p in 0..k_tail {
                        a_tail[r * TK + p] = src.add(p).read_unaligned();
                    }
                }
            }
            let mut j0 = 0;
            while j0 < n {
                let col_tiles = ((n - j0) / TN).min(2);
                let c_at =
                    |i: usize, j: usize| c.add((i0 + TR * i) * ldc + j0 + TN * j).cast::<u8>();
                for i in 0..row_tiles {
                    for j in 0..col_tiles {
                        match (accumulate, i, j) {
                            (true, 0, 0) => u.load::<{ C[0][0] }>(c_at(i, j), 4 * ldc),
                            (true, 0, _) => u.load::<{ C[0][1] }>(c_at(i, j), 4 * ldc),
                            (true, _, 0) => u.load::<{ C[1][0] }>(c_at(i, j), 4 * ldc),
                            (true, _, _) => u.load::<{ C[1][1] }>(c_at(i, j), 4 * ldc),
                            (false, 0, 0) => u.zero::<{ C[0][0] }>(),
                            (false, 0, _) => u.zero::<{ C[0][1] }>(),
                            (false, _, 0) => u.zero::<{ C[1][0] }>(),
                            (false, _, _) => u.zero::<{ C[1][1] }>(),
                        }
                    }
                }
                let step = |u: &mut U,
                            a_at: &dyn Fn(usize) -> (*const u8, usize),
                            b_at: &dyn Fn(usize) -> (*const u8, usize)| {
                    for i in 0..row_tiles {
                        let (p, s) = a_at(i);
                        on_tile!(u.load, A, i, p, s);
                    }
                    for j in 0..col_tiles {
                        let (p, s) = b_at(j);
                        on_tile!(u.load, B, j, p, s);
                    }
                    u.dot::<{ C[0][0] }, { A[0] }, { B[0] }>();
                    if col_tiles == 2 {
                        u.dot::<{ C[0][1] }, { A[0] }, { B[1] }>();
                    }
                    if row_tiles == 2 {
                        u.dot::<{ C[1][0] }, { A[1] }, { B[0] }>();
                        if col_tiles == 2 {
                            u.dot::<{ C[1][1] }, { A[1] }, { B[1] }>();
                        }
                    }
                };
                let mut p0 = 0;
                while p0 < k_full {
                    step(
                        u,
                        &|i| (a.add((i0 + TR * i) * lda + 2 * p0).cast(), 2 * lda),
                        &|j| (b.add((p0 * ldb + j0 + TN * j) * 2).cast(), 4 * ldb),
                    );
                    p0 += TK;
                }
                if k_tail > 0 {
                    b_tail.fill(0);
                    for p in 0..k_tail {
                        let src = b.add(((k_full + p) * ldb + j0) * 2).cast::<u32>();
                        for col in 0..TN * col_tiles {
                            b_tail[p * 2 * TN + col] = src.add(col).read_unaligned();
                        }
                    }
                    let (at, bt) = (a_tail.as_ptr(), b_tail.as_ptr());
                    step(u, &|i| (at.add(i * TR * TK).cast(), 4 * TK), &|j| {
                        (bt.add(TN * j).cast(), 4 * 2 * TN)
                    });
                }
                for i in 0..row_tiles {
                    for j in 0..col_tiles {
                        match (i, j) {
                            (0, 0) => u.store::<{ C[0][0] }>(c_at(i, j), 4 * ldc),
                            (0, _) => u.store::<{ C[0][1] }>(c_at(i, j), 4 * ldc),
                            (_, 0) => u.store::<{ C[1][0] }>(c_at(i, j), 4 * ldc),
                            _ => u.store::<{ C[1][1] }>(c_at(i, j), 4 * ldc),
                        }
                    }
                }
                j0 += TN * col_tiles;
            }
            i0 += TR * row_tiles;
        }
        if configured.is_some() {
            u.release();
        }
    }
}

/// The hardware tiles: each method is its instruction.
#[cfg(target_arch = "x86_64")]
struct Hardware;

#[cfg(target_arch = "x86_64")]
impl Tiles for Hardware {
    #[inline(always)]
    unsafe fn configure(&mut self, cfg: &TileConfig) {
        // SAFETY: `cfg` is a valid palette-1 configuration of 64 bytes; the caller promises AMX is ready.
        unsafe {
            std::arch::asm!("ldtilecfg [{0}]", in(reg) cfg as *const TileConfig, options(nostack))
        }
    }
    #[inline(always)]
    unsafe fn zero<const T: u8>(&mut self) {
        // SAFETY: tile T is configured (every tile [`tile_gemm`] names is).
        unsafe { std::arch::asm!("tilezero tmm{t}", t = const T, options(nomem, nostack)) }
    }
    #[inline(always)]
    unsafe fn load<const T: u8>(&mut self, src: *const u8, stride: usize) {
        // SAFETY: the caller promises the configured rows × bytes at `stride` are readable.
        unsafe {
            std::arch::asm!("tileloadd tmm{t}, [{p} + {s} * 1]", t = const T, p = in(reg) src,
                s = in(reg) stride, options(nostack, readonly))
        }
    }
    #[inline(always)]
    unsafe fn store<const T: u8>(&mut self, dst: *mut u8, stride: usize) {
        // SAFETY: the caller promises the configured rows × bytes at `stride` are writable.
        unsafe {
            std::arch::asm!("tilestored [{p} + {s} * 1], tmm{t}", t = const T, p = in(reg) dst,
                s = in(reg) stride, options(nostack))
        }
    }
    #[inline(always)]
    unsafe fn dot<const CT: u8, const AT: u8, const BT: u8>(&mut self) {
        // SAFETY: the three tiles are configured with matching shapes ([`TileConfig::for_rows`]).
        unsafe {
            std::arch::asm!("tdpbf16ps tmm{c}, tmm{a}, tmm{b}", c = const CT, a = const AT, b = const BT,
                options(nomem, nostack))
        }
    }
    #[inline(always)]
    unsafe fn release(&mut self) {
        // SAFETY: tilerelease only resets tile state.
        unsafe { std::arch::asm!("tilerelease", options(nomem, nostack)) }
    }
}

/// A scalar model of the tile instructions with the hardware's shape rules, which it checks (a violation
/// the hardware would fault on panics here): tiles of up to 16 rows × 64 bytes, loads that zero the
/// unconfigured rest, `tdpbf16ps` in the instruction's order of products with bf16 denormals read as zero
/// and f32 denormals flushed, as the hardware does.
pub(crate) struct Emulator {
    cfg: Option<TileConfig>,
    tiles: [[u8; 1024]; 8],
}

impl Emulator {
    pub(crate) fn new() -> Emulator {
        Emulator {
            cfg: None,
            tiles: [[0; 1024]; 8],
        }
    }

    /// Tile `t`'s configured `(rows, bytes per row)`.
    fn shape(&self, t: u8) -> (usize, usize) {
        let cfg = self
            .cfg
            .as_ref()
            .expect("tile instruction before ldtilecfg");
        let (rows, colsb) = (
            cfg.rows[t as usize] as usize,
            cfg.colsb[t as usize] as usize,
        );
        assert!(
            rows > 0 && rows <= 16 && colsb > 0 && colsb <= 64,
            "tile {t} is not configured"
        );
        (rows, colsb)
    }

    fn f32_at(&self, t: u8, r: usize, col: usize) -> f32 {
        let at = r * 64 + 4 * col;
        f32::from_le_bytes(self.tiles[t as usize][at..at + 4].try_into().unwrap())
    }

    /// The bf16 `half` (0 or 1) of pair `col` in row `r`, widened; a denormal reads as zero (DAZ).
    fn bf16_at(&self, t: u8, r: usize, col: usize, half: usize) -> f32 {
        let at = r * 64 + 4 * col + 2 * half;
        let bits = u16::from_le_bytes(self.tiles[t as usize][at..at + 2].try_into().unwrap());
        let x = f32::from_bits((bits as u32) << 16);
        if x.is_subnormal() { 0.0 } else { x }
    }
}

impl Tiles for Emulator {
    unsafe fn configure(&mut self, cfg: &TileConfig) {
        assert_eq!(cfg.palette, 1, "palette");
        assert_eq!(cfg.start_row, 0, "start_row");
        self.cfg = Some(*cfg);
        self.tiles = [[0; 1024]; 8];
    }
    unsafe fn zero<const T: u8>(&mut self) {
        self.shape(T);
        self.tiles[T as usize] = [0; 1024];
    }
    unsafe fn load<const T: u8>(&mut self, src: *const u8, stride: usize) {
        let (rows, colsb) = self.shape(T);
        let tile = &mut self.tiles[T as usize];
        *tile = [0; 1024];
        for r in 0..rows {
            // SAFETY: the caller promises row r's `colsb` bytes are readable.
            let row = unsafe { std::slice::from_raw_parts(src.add(r * stride), colsb) };
            tile[r * 64..r * 64 + colsb].copy_from_slice(row);
        }
    }
    unsafe fn store<const T: u8>(&mut self, dst: *mut u8, stride: usize) {
        let (rows, colsb) = self.shape(T);
        for r in 0..rows {
            // SAFETY: the caller promises row r's `colsb` bytes are writable; tiles never alias user memory.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.tiles[T as usize][r * 64..].as_ptr(),
                    dst.add(r * stride),
                    colsb,
                )
            };
        }
    }
    unsafe fn dot<const CT: u8, const AT: u8, const BT: u8>(&mut self) {
        let ((cr, cb), (ar, ab), (br, bb)) = (self.shape(CT), self.shape(AT), self.shape(BT));
        assert!(
            CT != AT && CT != BT && AT != BT,
            "tdpbf16ps needs three distinct tiles"
        );
        assert!(
            ar == cr && ab == 4 * br && bb == cb,
            "tdpbf16ps shapes: C {cr}x{cb}, A {ar}x{ab}, B {br}x{bb}"
        );
        for r in 0..cr {
            for col in 0..cb / 4 {
                let mut acc = self.f32_at(CT, r, col);
                for k in 0..ab / 4 {
                    acc += self.bf16_at(AT, r, k, 0) * self.bf16_at(BT, k, col, 0);
                    acc += self.bf16_at(AT, r, k, 1) * self.bf16_at(BT, k, col, 1);
                }
                let acc = if acc.is_subnormal() {
                    0.0f32.copysign(acc)
                } else {
                    acc
                };
                let at = r * 64 + 4 * col;
                self.tiles[CT as usize][at..at + 4].copy_from_slice(&acc.to_le_bytes());
            }
        }
    }
    unsafe fn release(&mut self) {
        self.cfg = None;
        self.tiles = [[0; 1024]; 8];
    }
}

/// bf16 operands on AMX tiles (`tdpbf16ps`), f32 accumulation. Its CPU has AVX-512 BF16 too, so packing and
/// decode use the AVX-512 code.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Amx;

/// [`Amx`]'s blocking on the [`Emulator`]: the tile logic, testable on every CPU (slow).
#[derive(Debug, Clone, Copy)]
pub(crate) struct AmxEmulated;

/// What both tile families share: bf16 pairs, f32 accumulators, the raw bf16 packing.
macro_rules! bf16_tile_family {
    ($family:ty, $avx512:expr, $tiles:expr) => {
        impl Kern for $family {
            type A = f32;
            type E = u16;
            const PAIR: usize = 2;
            const RAW: Option<DType> = Some(DType::BF16);
            const AVX512: bool = $avx512;
            #[inline(always)]
            fn to_e(x: f32) -> u16 {
                bf16_bits(x)
            }
            #[inline(always)]
            fn load<T: Float>(x: T) -> u16 {
                bf16_bits(x.to_f32())
            }
            #[cfg(target_arch = "x86_64")]
            #[inline(always)]
            unsafe fn exp_row(s: &[f32], m: f32, p: &mut [u16]) -> f32 {
                if $avx512 {
                    // SAFETY: forwarded promise; AMX is only used where AVX-512 BF16 is too (`isa::Amx`).
                    unsafe { super::avx512::exp_row_bf16(s, m, p) }
                } else {
                    crate::kernel::softmax::exp_row(s, m, p, bf16_bits)
                }
            }
            #[cfg(target_arch = "x86_64")]
            #[inline(always)]
            unsafe fn max_row(s: &[f32]) -> f32 {
                if $avx512 {
                    // SAFETY: as above.
                    unsafe { super::avx512::max_row16(s) }
                } else {
                    crate::kernel::softmax::max_row(s)
                }
            }
            #[cfg(target_arch = "x86_64")]
            #[inline(always)]
            unsafe fn transpose_units(
                src: *const u8,
                row_bytes: isize,
                n: usize,
                units: usize,
                dst: *mut u32,
                ld: usize,
            ) {
                if $avx512 {
                    // SAFETY: forwarded promise; an AVX-512 family only runs on CPUs with AVX-512F.
                    unsafe { super::avx512::transpose16(src, row_bytes, n, units, dst, ld) }
                } else {
                    // SAFETY: forwarded promise.
                    unsafe { super::scalar_units(src, row_bytes, 0..n, 0..units, dst, ld) }
                }
            }
            #[inline(always)]
            unsafe fn gemm(
                m: usize,
                n: usize,
                kp: usize,
                a: *const u16,
                lda: usize,
                b: *const u16,
                ldb: usize,
                c: *mut f32,
                ldc: usize,
                accumulate: bool,
            ) {
                // SAFETY: forwarded promise; the driver only builds this family when its tiles can run.
                unsafe { tile_gemm(&mut $tiles, m, n, kp, a, lda, b, ldb, c, ldc, accumulate) }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
bf16_tile_family!(Amx, true, Hardware);
bf16_tile_family!(AmxEmulated, false, Emulator::new());

/// An f32 as two bf16 in one 32-bit unit, `hi` in the low half: `hi` is `x` rounded to bf16 and `lo` the rest
/// rounded to bf16, so `hi + lo` keeps about 16 significant bits of `x` (a non-finite rest gives `lo = 0`).
#[inline(always)]
pub(crate) fn split_bits(x: f32) -> u32 {
    let hi = bf16_bits(x);
    let rest = x - f32::from_bits((hi as u32) << 16);
    let lo = if rest.is_finite() { bf16_bits(rest) } else { 0 };
    hi as u32 | (lo as u32) << 16
}

/// f32 operands as bf16×3 on AMX tiles (torch's `"high"` float32 matmul precision): `a·b ≈ a_hi·b_hi +
/// a_hi·b_lo + a_lo·b_hi`, f32 accumulation. An operand unit is [`split_bits`] of one element (`PAIR == 1`),
/// so every packer works unchanged and B's units are already `tdpbf16ps` pairs `(b_hi, b_lo)`. A is rewritten
/// per product into `(a_hi, a_hi)` and `(a_lo, 0)` pairs: the first tile product gives `a_hi·b_hi + a_hi·b_lo`,
/// the second `a_lo·b_hi`.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy)]
pub(crate) struct AmxBf16x3;

/// [`AmxBf16x3`] on the [`Emulator`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct AmxEmulatedBf16x3;

/// Query rows (or P rows) rewritten per block in [`bf16x3_gemm`].
const SPLIT_ROWS: usize = 2 * TR;

thread_local! {
    /// [`bf16x3_gemm`]'s A operands, reused by each thread.
    static SPLIT_A: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`Kern::gemm`] of the bf16×3 families on tiles `U` (see [`AmxBf16x3`]).
///
/// # Safety
/// [`Kern::gemm`]'s, plus [`Tiles::configure`]'s.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn bf16x3_gemm<U: Tiles>(
    new: impl Fn() -> U,
    m: usize,
    n: usize,
    kp: usize,
    a: *const u32,
    lda: usize,
    b: *const u32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    SPLIT_A.with(|cell| {
        let mut scratch = cell.borrow_mut();
        scratch.resize(2 * SPLIT_ROWS * kp, 0);
        let (high, low) = scratch.split_at_mut(SPLIT_ROWS * kp);
        let mut i0 = 0;
        while i0 < m {
            let rows = (m - i0).min(SPLIT_ROWS);
            for r in 0..rows {
                for p in 0..kp {
                    // SAFETY: element (i0 + r, p) of A is in the caller's range.
                    let unit = unsafe { a.add((i0 + r) * lda + p).read() };
                    let (hi, lo) = (unit & 0xffff, unit >> 16);
                    high[r * kp + p] = hi | hi << 16;
                    low[r * kp + p] = lo;
                }
            }
            // SAFETY: `high`/`low` hold `rows` rows of `kp` pairs; B and the C rows i0..i0 + rows are the
            // caller's; the caller promises the tiles can run.
            unsafe {
                let (b, c) = (b.cast::<u16>(), c.add(i0 * ldc));
                let mut tiles = new();
                tile_gemm(
                    &mut tiles,
                    rows,
                    n,
                    kp,
                    high.as_ptr().cast(),
                    2 * kp,
                    b,
                    ldb,
                    c,
                    ldc,
                    accumulate,
                );
                tile_gemm(
                    &mut tiles,
                    rows,
                    n,
                    kp,
                    low.as_ptr().cast(),
                    2 * kp,
                    b,
                    ldb,
                    c,
                    ldc,
                    true,
                );
            }
            i0 += rows;
        }
    });
}

/// What both bf16×3 families share.
macro_rules! bf16x3_tile_family {
    ($family:ty, $avx512:expr, $tiles:expr) => {
        impl Kern for $family {
            type A = f32;
            type E = u32;
            const PAIR: usize = 1;
            const RAW: Option<DType> = None;
            const AVX512: bool = $avx512;
            #[inline(always)]
            fn to_e(x: f32) -> u32 {
                split_bits(x)
            }
            #[inline(always)]
            fn load<T: Float>(x: T) -> u32 {
                split_bits(x.to_f32())
            }
            #[inline(always)]
            unsafe fn gemm(
                m: usize,
                n: usize,
                kp: usize,
                a: *const u32,
                lda: usize,
                b: *const u32,
                ldb: usize,
                c: *mut f32,
                ldc: usize,
                accumulate: bool,
            ) {
                // SAFETY: forwarded promise; the driver only builds this family when its tiles can run.
                unsafe { bf16x3_gemm(|| $tiles, m, n, kp, a, lda, b, ldb, c, ldc, accumulate) }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
bf16x3_tile_family!(AmxBf16x3, true, Hardware);
bf16x3_tile_family!(AmxEmulatedBf16x3, false, Emulator::new());

#[cfg(test)]
mod tests {
    use super::*;

    /// The tile product against a plain f64 sum of the same bf16 operands, over shapes that exercise every
    /// remainder: rows (1, 15, 16, 17, 33), column tiles (1, 2, 3) and k (a partial step, full steps, both).
    #[test]
    fn emulated_tiles_compute_the_packed_product() {
        let mut seed = 7u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        for (m, n, kp) in [
            (1, 16, 1),
            (15, 32, 16),
            (16, 48, 17),
            (17, 16, 40),
            (33, 48, 32),
            (5, 64, 3),
        ] {
            for accumulate in [false, true] {
                let (lda, ldb, ldc) = (2 * kp + 2, n + 16, n + 3);
                let a: Vec<u16> = (0..m * lda).map(|_| bf16_bits(next())).collect();
                let b: Vec<u16> = (0..kp * ldb * 2).map(|_| bf16_bits(next())).collect();
                let c0: Vec<f32> = (0..m * ldc).map(|_| next()).collect();
                let mut c = c0.clone();
                // SAFETY: the buffers hold the ranges Kern::gemm names; the emulator runs anywhere.
                unsafe {
                    AmxEmulated::gemm(
                        m,
                        n,
                        kp,
                        a.as_ptr(),
                        lda,
                        b.as_ptr(),
                        ldb,
                        c.as_mut_ptr(),
                        ldc,
                        accumulate,
                    )
                };
                let wide = |x: u16| f32::from_bits((x as u32) << 16) as f64;
                for i in 0..m {
                    for j in 0..ldc {
                        let got = c[i * ldc + j];
                        if j >= n {
                            assert_eq!(got, c0[i * ldc + j], "column {j} past n was written");
                            continue;
                        }
                        let mut want = if accumulate {
                            c0[i * ldc + j] as f64
                        } else {
                            0.0
                        };
                        for p in 0..2 * kp {
                            want += wide(a[i * lda + p]) * wide(b[((p / 2) * ldb + j) * 2 + p % 2]);
                        }
                        assert!(
                            (got as f64 - want).abs() < 1e-5 * (1.0 + want.abs()) * kp as f64,
                            "m{m} n{n} kp{kp} acc {accumulate}: c[{i}][{j}] = {got}, want {want}"
                        );
                    }
                }
            }
        }
    }

    /// bf16×3 products of f32 operands: their error against f64 sits between bf16's and f32's.
    #[test]
    fn emulated_bf16x3_tiles_are_between_bf16_and_f32() {
        let (m, n, kp) = (37, 48, 70);
        let mut seed = 3u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        let a: Vec<f32> = (0..m * kp).map(|_| next()).collect();
        let b: Vec<f32> = (0..kp * n).map(|_| next()).collect();
        let (ap, bp): (Vec<u32>, Vec<u32>) = (
            a.iter().map(|&x| split_bits(x)).collect(),
            b.iter().map(|&x| split_bits(x)).collect(),
        );
        let mut c = vec![0f32; m * n];
        // SAFETY: the buffers hold the ranges Kern::gemm names; the emulator runs anywhere.
        unsafe {
            AmxEmulatedBf16x3::gemm(
                m,
                n,
                kp,
                ap.as_ptr(),
                kp,
                bp.as_ptr(),
                n,
                c.as_mut_ptr(),
                n,
                false,
            )
        };
        let round = |x: f32| f32::from_bits((bf16_bits(x) as u32) << 16) as f64;
        let (mut worst, mut worst_bf16) = (0f64, 0f64);
        for i in 0..m {
            for j in 0..n {
                let exact: f64 = (0..kp)
                    .map(|p| a[i * kp + p] as f64 * b[p * n + j] as f64)
                    .sum();
                let bf16: f64 = (0..kp)
                    .map(|p| round(a[i * kp + p]) * round(b[p * n + j]))
                    .sum();
                worst = worst.max((c[i * n + j] as f64 - exact).abs());
                worst_bf16 = worst_bf16.max((bf16 - exact).abs());
            }
        }
        eprintln!("max |c - f64|: bf16x3 {worst:e}, bf16 {worst_bf16:e}");
        assert!(
            worst < 2e-4 && worst * 30.0 < worst_bf16,
            "bf16x3 {worst}, bf16 {worst_bf16}"
        );
    }

    #[test]
    #[should_panic(expected = "tdpbf16ps shapes")]
    fn the_emulator_refuses_what_the_hardware_faults_on() {
        let mut u = Emulator::new();
        let mut cfg = TileConfig::for_rows([16, 0]);
        cfg.rows[B[0] as usize] = 8; // A is 64 bytes wide (16 pairs) but B has 8 pair-rows
        // SAFETY: the emulator touches no memory here.
        unsafe {
            u.configure(&cfg);
            u.dot::<{ C[0][0] }, { A[0] }, { B[0] }>();
        }
    }

    #[test]
    fn the_configuration_is_the_64_byte_palette_1_layout() {
        assert_eq!(std::mem::size_of::<TileConfig>(), 64);
        let cfg = TileConfig::for_rows([16, 3]);
        // SAFETY: TileConfig is 64 plain bytes.
        let bytes: [u8; 64] = unsafe { std::mem::transmute(cfg) };
        assert_eq!(bytes[0], 1);
        assert_eq!(u16::from_le_bytes([bytes[16], bytes[17]]), 64, "tmm0 colsb");
        assert_eq!(bytes[48], 16, "tmm0 rows");
        assert_eq!(bytes[48 + 2], 3, "tmm2 rows (second row tile)");
        assert_eq!(bytes[48 + 6], 16, "tmm6 rows (B: 16 pair-rows)");
    }
}
