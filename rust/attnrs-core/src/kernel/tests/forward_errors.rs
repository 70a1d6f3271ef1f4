//! The forward's argument errors (each names its argument; none panics) and edge rows.

use super::forward_support::*;
use crate::Error;
use crate::Result;
use crate::isa::Isa;
use crate::kernel::args::*;
use crate::kernel::tests::support::{Layout, Rng};
use crate::kernel::*;
use crate::mask::tiles::NoMask;
use crate::tensor::{DType, TensorView};

fn f32_buf(shape: &[usize]) -> Buf {
    Buf::new(
        DType::F32,
        shape,
        Layout::Contiguous,
        &mut Rng(7),
        &mut |r| r.range(-1.0, 1.0),
    )
}

#[test]
fn errors_name_the_argument_and_never_panic() {
    let q = f32_buf(&[1, 4, 3, 8]);
    let k = f32_buf(&[1, 2, 5, 8]);
    let v = f32_buf(&[1, 2, 5, 6]);
    let out = f32_buf(&[1, 4, 3, 6]);
    let lse = f32_buf(&[1, 4, 3]);
    let base = AttentionArgs {
        query: &q.view,
        key: &k.view,
        value: &v.view,
        out: &out.view,
        lse: Some(&lse.view),
        mask: &NoMask,
        bias: None,
        scale: 0.3,
        softcap: None,
        sinks: None,
        dropout: None,
        score: Default::default(),
        num_threads: 2,
        f32_precision: Default::default(),
    };
    attention_forward(&base).unwrap();
    let arg_of = |r: Result<()>| match r.unwrap_err() {
        Error::Shape { arg, .. }
        | Error::Dtype { arg, .. }
        | Error::Layout { arg, .. }
        | Error::Value { arg, .. } => arg,
        other => panic!("unexpected error {other}"),
    };
    let k3 = f32_buf(&[1, 3, 5, 8]);
    assert_eq!(
        arg_of(attention_forward(&AttentionArgs {
            key: &k3.view,
            ..base
        })),
        "key"
    );
    let q3 = f32_buf(&[4, 3, 8]);
    assert_eq!(
        arg_of(attention_forward(&AttentionArgs {
            query: &q3.view,
            ..base
        })),
        "query"
    );
    let kd = f32_buf(&[1, 2, 5, 7]);
    assert_eq!(
        arg_of(attention_forward(&AttentionArgs {
            key: &kd.view,
            ..base
        })),
        "key"
    );
    let kb = f32_buf(&[2, 2, 5, 8]);
    assert_eq!(
        arg_of(attention_forward(&AttentionArgs {
            key: &kb.view,
            ..base
        })),
        "key"
    );
    let vk = f32_buf(&[1, 2, 4, 6]);
    assert_eq!(
        arg_of(attention_forward(&AttentionArgs {
            value: &vk.view,
            ..base
        })),
        "value"
    );
    let ov = f32_buf(&[1, 4, 3, 5]);
    assert_eq!(
        arg_of(attention_forward(&AttentionArgs {
            out: &ov.view,
            ..base
        })),
        "out"
    );
    let vb = Buf::new(
        DType::BF16,
        &[1, 2, 5, 6],
        Layout::Contiguous,
        &mut Rng(1),
        &mut |_| 0.0,
    );
    assert_eq!(
        arg_of(attention_forward(&AttentionArgs {
            value: &vb.view,
            ..base
        })),
        "value"
    );
    let lb = Buf::new(
        DType::F64,
        &[1, 4, 3],
        Layout::Contiguous,
        &mut Rng(1),
        &mut |_| 0.0,
    );
    assert_eq!(
        arg_of(attention_forward(&AttentionArgs {
            lse: Some(&lb.view),
            ..base
        })),
        "lse"
    );
    let ls = f32_buf(&[1, 4, 2]);
    assert_eq!(
        arg_of(attention_forward(&AttentionArgs {
            lse: Some(&ls.view),
            ..base
        })),
        "lse"
    );
    let bias = f32_buf(&[2, 3, 5]);
    assert_eq!(
        arg_of(attention_forward(&AttentionArgs {
            bias: Some(&bias.view),
            ..base
        })),
        "bias"
    );
    let bias_ok = f32_buf(&[3, 1]);
    attention_forward(&AttentionArgs {
        bias: Some(&bias_ok.view),
        ..base
    })
    .unwrap();
    let sinks = f32_buf(&[2]);
    assert_eq!(
        arg_of(attention_forward(&AttentionArgs {
            sinks: Some(&sinks.view),
            ..base
        })),
        "sinks"
    );
    assert_eq!(
        arg_of(attention_forward(&AttentionArgs {
            scale: f64::NAN,
            ..base
        })),
        "scale"
    );
    assert_eq!(
        arg_of(attention_forward(&AttentionArgs {
            softcap: Some(0.0),
            ..base
        })),
        "softcap"
    );
    assert_eq!(
        arg_of(attention_forward(&AttentionArgs {
            softcap: Some(f64::INFINITY),
            ..base
        })),
        "softcap"
    );
    // Finite in f64 but not as the f32 the kernels compute in.
    assert_eq!(
        arg_of(attention_forward(&AttentionArgs {
            scale: 1e39,
            ..base
        })),
        "scale"
    );
    assert_eq!(
        arg_of(attention_forward(&AttentionArgs {
            softcap: Some(1e-40),
            ..base
        })),
        "softcap"
    );
    // Outputs aliasing inputs or themselves.
    assert_eq!(
        arg_of(attention_forward(&AttentionArgs {
            out: &q.view,
            ..base
        })),
        "out"
    );
    let ob = Buf::new(
        DType::F32,
        &[1, 4, 3, 6],
        Layout::Broadcast(1),
        &mut Rng(1),
        &mut |_| 0.0,
    );
    assert_eq!(
        arg_of(attention_forward(&AttentionArgs {
            out: &ob.view,
            ..base
        })),
        "out"
    );
    // SAFETY: the view covers the first 12 elements of `out`'s storage, which is larger.
    let lse_alias =
        unsafe { TensorView::new(out.view.as_ptr(), DType::F32, vec![1, 4, 3], vec![12, 3, 1]) }
            .unwrap();
    assert_eq!(
        arg_of(attention_forward(&AttentionArgs {
            lse: Some(&lse_alias),
            ..base
        })),
        "lse"
    );
    let qi = Buf::new(
        DType::I32,
        &[1, 4, 3, 8],
        Layout::Contiguous,
        &mut Rng(1),
        &mut |_| 0.0,
    );
    assert!(matches!(
        attention_forward(&AttentionArgs {
            query: &qi.view,
            ..base
        }),
        Err(Error::Dtype { .. })
    ));
    // Forcing a path the CPU lacks is an error, not a crash.
    let isa = Isa::get();
    if !isa.avx512f {
        assert!(matches!(
            attention_forward_with(&base, Backend::Avx512),
            Err(Error::Unsupported(_))
        ));
    }
}

#[test]
fn finfo_min_bias_row_is_the_mean_of_v_and_empty_rows_are_zero() {
    let q = f32_buf(&[1, 1, 2, 4]);
    let k = f32_buf(&[1, 1, 3, 4]);
    let v = f32_buf(&[1, 1, 3, 2]);
    let out = f32_buf(&[1, 1, 2, 2]);
    let lse = f32_buf(&[1, 1, 2]);
    // Row 0: every entry finfo.min (transformers' "masked"); row 1: every entry -inf.
    let mut rows = [
        f32::MIN,
        f32::MIN,
        f32::MIN,
        f32::NEG_INFINITY,
        f32::NEG_INFINITY,
        f32::NEG_INFINITY,
    ]
    .into_iter();
    let bias = Buf::new(
        DType::F32,
        &[2, 3],
        Layout::Contiguous,
        &mut Rng(0),
        &mut |_| rows.next().unwrap() as f64,
    );
    let args = AttentionArgs {
        query: &q.view,
        key: &k.view,
        value: &v.view,
        out: &out.view,
        lse: Some(&lse.view),
        mask: &NoMask,
        bias: Some(&bias.view),
        scale: 1.0,
        softcap: None,
        sinks: None,
        dropout: None,
        score: Default::default(),
        num_threads: 1,
        f32_precision: Default::default(),
    };
    for backend in backends(DType::F32) {
        attention_forward_with(&args, backend).unwrap();
        for c in 0..2 {
            let mean = (0..3).map(|j| v.get(&[0, 0, j, c])).sum::<f64>() / 3.0;
            assert!((out.get(&[0, 0, 0, c]) - mean).abs() < 1e-6);
            assert_eq!(out.get(&[0, 0, 1, c]), 0.0);
        }
        assert_eq!(lse.get(&[0, 0, 1]), f64::NEG_INFINITY);
        assert!(lse.get(&[0, 0, 0]).is_finite());
    }
}
