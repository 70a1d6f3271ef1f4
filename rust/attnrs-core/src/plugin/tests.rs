//! The C ABI end to end without Python: the example crate's naive kernel (compiled in here from
//! `examples/native_kernel/src/naive.rs`) published as an `AttnKernelV1`, validated, registered and run
//! against the built-in kernel; bad tables, panics and misbehaving kernels become errors.

use std::ffi::c_void;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use attnrs_abi::{AttnArgsV1, AttnKernelV1, AttnTile, KernelError, feature, forward_fn, mask_kind};

use super::*;
use crate::mask::tiles::NoMask;
use crate::mask::{MaskExpr, PlacedMask};
use crate::registry::{BUILTIN_KERNEL, kernels, register_kernel, run_kernel};

#[path = "../../../../examples/native_kernel/src/naive.rs"]
mod naive;

forward_fn!(fn naive_forward = naive::forward;);

static PANICS: naive::Settings = naive::Settings {
    panic_on_call: true,
};

const FEATURES: u64 = feature::LSE | feature::SOFTCAP | feature::SINKS | feature::GQA;

static NAIVE: AttnKernelV1 = AttnKernelV1 {
    features: FEATURES,
    ..AttnKernelV1::new(c"naive", naive_forward)
};

/// The table with a `user_data` pointer (a `static` cannot hold one directly: raw pointers are not `Sync`).
fn panicking_table() -> AttnKernelV1 {
    AttnKernelV1 {
        user_data: (&PANICS as *const naive::Settings)
            .cast_mut()
            .cast::<c_void>(),
        ..NAIVE
    }
}

fn kernel(table: &AttnKernelV1) -> Result<AbiKernel> {
    // SAFETY: `table` is a whole table whose functions and name are 'static.
    unsafe { AbiKernel::from_raw(table, None) }
}

/// splitmix64.
fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f32 / (1u64 << 53) as f32 * 4.0 - 2.0
        })
        .collect()
}

fn view(buf: &mut [f32], shape: &[usize]) -> TensorView {
    let mut strides = vec![1isize; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1] as isize;
    }
    // SAFETY: a contiguous view of exactly `buf`.
    unsafe { TensorView::new(buf.as_mut_ptr().cast(), DType::F32, shape.to_vec(), strides) }
        .unwrap()
}

struct Case {
    shape: [usize; 6], // B, H, Hkv, Q, K, D
    softcap: Option<f64>,
    sinks: bool,
}

/// Runs `name` and the built-in kernel on the same inputs; returns the largest difference of out and lse.
fn compare(name: &str, case: &Case, mask: &dyn MaskTiles, masked: bool) -> Result<f32> {
    let [b, h, hkv, q, k, d] = case.shape;
    let (mut qb, mut kb, mut vb) = (
        values(1, b * h * q * d),
        values(2, b * hkv * k * d),
        values(3, b * hkv * k * d),
    );
    let mut sinks = values(4, h);
    let (qv, kv, vv) = (
        view(&mut qb, &[b, h, q, d]),
        view(&mut kb, &[b, hkv, k, d]),
        view(&mut vb, &[b, hkv, k, d]),
    );
    let sinks = case.sinks.then(|| view(&mut sinks, &[h]));
    let mut results = Vec::new();
    for kernel_name in [name, BUILTIN_KERNEL] {
        let mut out = vec![7.0f32; b * h * q * d];
        let mut lse = vec![7.0f32; b * h * q];
        let (ov, lv) = (view(&mut out, &[b, h, q, d]), view(&mut lse, &[b, h, q]));
        let args = AttentionArgs {
            query: &qv,
            key: &kv,
            value: &vv,
            out: &ov,
            lse: Some(&lv),
            mask,
            bias: None,
            scale: 0.3,
            softcap: case.softcap,
            sinks: sinks.as_ref(),
            dropout: None,
            score: Default::default(),
            num_threads: 3,
            f32_precision: Default::default(),
        };
        run_kernel(kernel_name, &args, masked)?;
        results.push((out, lse));
    }
    let diff = |a: &[f32], b: &[f32]| {
        a.iter().zip(b).fold(
            0.0f32,
            |m, (x, y)| {
                if x == y { m } else { m.max((x - y).abs()) }
            },
        )
    };
    Ok(diff(&results[0].0, &results[1].0).max(diff(&results[0].1, &results[1].1)))
}

#[test]
fn naive_plugin_matches_the_builtin_kernel() {
    register_kernel("naive-test", Arc::new(kernel(&NAIVE).unwrap())).unwrap();
    let window = PlacedMask::new(MaskExpr::sliding_window(5, true).unwrap(), 3, 0);
    let cases = [
        (
            Case {
                shape: [1, 2, 2, 9, 9, 8],
                softcap: None,
                sinks: false,
            },
            &NoMask as &dyn MaskTiles,
            false,
        ),
        (
            Case {
                shape: [2, 4, 2, 37, 70, 16],
                softcap: None,
                sinks: false,
            },
            &PlacedMask::new(MaskExpr::causal_with_offset(33), 0, 0),
            true,
        ),
        (
            Case {
                shape: [1, 4, 1, 20, 23, 8],
                softcap: Some(5.0),
                sinks: true,
            },
            &window,
            true,
        ),
        (
            Case {
                shape: [1, 2, 2, 3, 90, 4],
                softcap: None,
                sinks: true,
            },
            &PlacedMask::new(MaskExpr::causal_with_offset(-2), 0, 0),
            true,
        ),
    ];
    for (case, mask, masked) in &cases {
        let diff = compare("naive-test", case, *mask, *masked).unwrap();
        assert!(diff < 2e-5, "shape {:?}: max difference {diff}", case.shape);
    }
    let info = kernels().get("naive-test").unwrap();
    assert_eq!(info.origin(), "plugin 'naive' (ABI v1)");
    assert!(info.capabilities().lse && !info.capabilities().backward);
    kernels().remove("naive-test");
}

#[test]
fn bad_tables_are_refused_with_their_reason() {
    let reason = |t: &AttnKernelV1| kernel(t).unwrap_err().to_string();
    assert!(
        reason(&AttnKernelV1 {
            abi_version: 2,
            ..NAIVE
        })
        .contains("ABI version 2")
    );
    assert!(
        reason(&AttnKernelV1 {
            struct_size: 16,
            ..NAIVE
        })
        .contains("struct_size 16")
    );
    assert!(
        reason(&AttnKernelV1 {
            name: std::ptr::null(),
            ..NAIVE
        })
        .contains("null name")
    );
    assert!(
        reason(&AttnKernelV1 {
            forward: None,
            ..NAIVE
        })
        .contains("null forward")
    );
    assert!(reason(&AttnKernelV1 { dtypes: 0, ..NAIVE }).contains("at least one dtype"));
    assert!(
        reason(&AttnKernelV1 {
            mask_kinds: 0,
            ..NAIVE
        })
        .contains("mask kinds")
    );
    // SAFETY: a null pointer is refused before anything is read.
    let null = unsafe { AbiKernel::from_raw(std::ptr::null(), None) };
    assert!(null.unwrap_err().to_string().contains("null pointer"));
    // A larger struct_size (a newer minor layout) is accepted.
    let newer = [NAIVE, NAIVE];
    let mut table = newer[0];
    table.struct_size += 16;
    assert!(kernel(&table).is_ok());
}

#[test]
fn panics_and_refusals_become_errors() {
    register_kernel(
        "naive-panics",
        Arc::new(kernel(&panicking_table()).unwrap()),
    )
    .unwrap();
    let case = Case {
        shape: [1, 2, 1, 4, 4, 4],
        softcap: None,
        sinks: false,
    };
    match compare("naive-panics", &case, &NoMask, false) {
        Err(Error::Kernel {
            status: s,
            message,
            kernel,
        }) => {
            assert_eq!((s, kernel.as_str()), (status::PANIC, "naive"));
            assert!(message.contains("asked to panic"), "{message}");
        }
        other => panic!("expected a kernel error, got {other:?}"),
    }
    kernels().remove("naive-panics");
    // Declared without GQA: the call is refused before the kernel runs.
    let no_gqa = AttnKernelV1 {
        features: feature::LSE,
        ..NAIVE
    };
    register_kernel("naive-no-gqa", Arc::new(kernel(&no_gqa).unwrap())).unwrap();
    let err = compare("naive-no-gqa", &case, &NoMask, false).unwrap_err();
    assert!(
        matches!(&err, Error::Unsupported(m) if m.contains("GQA")),
        "{err}"
    );
    let unmasked = AttnKernelV1 {
        mask_kinds: mask_kind::NONE,
        features: FEATURES,
        ..NAIVE
    };
    register_kernel("naive-unmasked", Arc::new(kernel(&unmasked).unwrap())).unwrap();
    let err = compare(
        "naive-unmasked",
        &case,
        &PlacedMask::new(MaskExpr::causal_with_offset(0), 0, 0),
        true,
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::Unsupported(m) if m.contains("no masks")),
        "{err}"
    );
    kernels().remove("naive-no-gqa");
    kernels().remove("naive-unmasked");
}

fn asks_outside(_: *mut c_void, args: &AttnArgsV1) -> Result<(), KernelError> {
    let tile = AttnTile {
        batch: 0,
        head: 0,
        row_start: 0,
        row_end: 1,
        col_start: 0,
        col_end: 1_000_000,
    };
    // SAFETY: the host's mask, during the call.
    let class = unsafe { (*args.mask).classify(&tile) };
    assert_eq!(class, attnrs_abi::tile_class::ERROR);
    Ok(())
}
forward_fn!(fn asks_outside_c = asks_outside;);

#[test]
fn out_of_range_tiles_are_refused() {
    static TABLE: AttnKernelV1 = AttnKernelV1 {
        features: FEATURES,
        ..AttnKernelV1::new(c"outside", asks_outside_c)
    };
    register_kernel("outside", Arc::new(kernel(&TABLE).unwrap())).unwrap();
    let case = Case {
        shape: [1, 1, 1, 4, 4, 4],
        softcap: None,
        sinks: false,
    };
    let err = compare("outside", &case, &NoMask, false).unwrap_err();
    assert!(err.to_string().contains("outside the grid"), "{err}");
    kernels().remove("outside");
}

/// A kernel written in Rust and registered through the Rust API: it counts its calls and delegates.
#[derive(Debug, Default)]
struct Counting {
    calls: AtomicUsize,
    capabilities: Capabilities,
}

impl AttentionKernel for Counting {
    fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }
    fn features(&self) -> KernelFeatures {
        KernelFeatures::ALL
    }
    fn origin(&self) -> String {
        "test".into()
    }
    fn forward(&self, args: &AttentionArgs<'_>) -> Result<()> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        crate::kernel::attention_forward(args)
    }
}

#[test]
fn rust_kernels_register_through_the_core_api() {
    let counting = Arc::new(Counting {
        capabilities: Capabilities {
            lse: true,
            ..Default::default()
        },
        ..Default::default()
    });
    register_kernel("counting", counting.clone()).unwrap();
    let case = Case {
        shape: [1, 2, 1, 5, 6, 4],
        softcap: Some(3.0),
        sinks: true,
    };
    assert_eq!(
        compare(
            "counting",
            &case,
            &PlacedMask::new(MaskExpr::causal_with_offset(1), 0, 0),
            true
        )
        .unwrap(),
        0.0
    );
    assert_eq!(counting.calls.load(Ordering::Relaxed), 1);
    kernels().remove("counting");
    let builtin = kernels()
        .get(BUILTIN_KERNEL)
        .expect("the built-in kernel is registered");
    assert_eq!(builtin.capabilities().dtypes.len(), 4);
    match compare("nope", &case, &NoMask, false) {
        Err(Error::UnknownName { valid, .. }) => {
            assert!(valid.contains(&BUILTIN_KERNEL.to_owned()))
        }
        other => panic!("{other:?}"),
    }
}
