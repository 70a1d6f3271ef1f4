//! The backward's argument errors (each names its argument; none panics) and the key-tile width choice.

use super::backward_reference::*;
use crate::isa::Isa;
use crate::kernel::args::*;
use crate::kernel::backward::*;
use crate::kernel::tests::support::{Layout, Rng, causal};
use crate::kernel::*;
use crate::mask::tiles::NoMask;
use crate::tensor::{DType, TensorView};
use crate::{Error, Result};

#[test]
fn errors_name_the_argument_and_never_panic() {
    let f32_buf = |shape: &[usize]| {
        let n: usize = shape.iter().product();
        let mut rng = Rng(n as u64);
        let data: Vec<f64> = (0..n).map(|_| rng.range(-1.0, 1.0)).collect();
        Buf::new(DType::F32, shape, Layout::Contiguous, &data)
    };
    let q = f32_buf(&[1, 4, 3, 8]);
    let k = f32_buf(&[1, 2, 5, 8]);
    let v = f32_buf(&[1, 2, 5, 6]);
    let out = f32_buf(&[1, 4, 3, 6]);
    let dout = f32_buf(&[1, 4, 3, 6]);
    let lse = f32_buf(&[1, 4, 3]);
    let gq = f32_buf(&[1, 4, 3, 8]);
    let gk = f32_buf(&[1, 2, 5, 8]);
    let gv = f32_buf(&[1, 2, 5, 6]);
    let sinks = f32_buf(&[4]);
    let base = AttentionGradArgs {
        grad_lse: None,
        query: &q.view,
        key: &k.view,
        value: &v.view,
        out: &out.view,
        grad_out: &dout.view,
        lse: &lse.view,
        mask: &NoMask,
        bias: None,
        scale: 0.3,
        softcap: None,
        sinks: None,
        grad_query: &gq.view,
        grad_key: &gk.view,
        grad_value: &gv.view,
        grad_sinks: None,
        grad_bias: None,
        dropout: None,
        score: Default::default(),
        grad_score_distance: None,
        grad_score_key: None,
        num_threads: 2,
        f32_precision: Default::default(),
    };
    attention_backward(&base).unwrap();
    assert!(format!("{base:?}").contains("AttentionGradArgs"));
    let arg_of = |r: Result<()>| match r.unwrap_err() {
        Error::Shape { arg, .. }
        | Error::Dtype { arg, .. }
        | Error::Layout { arg, .. }
        | Error::Value { arg, .. } => arg,
        other => panic!("unexpected error {other}"),
    };
    let bad = |a: AttentionGradArgs| arg_of(attention_backward(&a));
    let k3 = f32_buf(&[1, 3, 5, 8]);
    assert_eq!(
        bad(AttentionGradArgs {
            key: &k3.view,
            ..base
        }),
        "key"
    );
    let q3 = f32_buf(&[4, 3, 8]);
    assert_eq!(
        bad(AttentionGradArgs {
            query: &q3.view,
            ..base
        }),
        "query"
    );
    let vk = f32_buf(&[1, 2, 4, 6]);
    assert_eq!(
        bad(AttentionGradArgs {
            value: &vk.view,
            ..base
        }),
        "value"
    );
    let o5 = f32_buf(&[1, 4, 3, 5]);
    assert_eq!(
        bad(AttentionGradArgs {
            out: &o5.view,
            ..base
        }),
        "out"
    );
    assert_eq!(
        bad(AttentionGradArgs {
            grad_out: &o5.view,
            ..base
        }),
        "grad_out"
    );
    let l2 = f32_buf(&[1, 4, 2]);
    assert_eq!(
        bad(AttentionGradArgs {
            lse: &l2.view,
            ..base
        }),
        "lse"
    );
    let l64 = Buf::new(DType::F64, &[1, 4, 3], Layout::Contiguous, &[0.0; 12]);
    assert_eq!(
        bad(AttentionGradArgs {
            lse: &l64.view,
            ..base
        }),
        "lse"
    );
    let gq7 = f32_buf(&[1, 4, 3, 7]);
    assert_eq!(
        bad(AttentionGradArgs {
            grad_query: &gq7.view,
            ..base
        }),
        "grad_query"
    );
    let gk16 = Buf::new(DType::BF16, &[1, 2, 5, 8], Layout::Contiguous, &[0.0; 80]);
    assert_eq!(
        bad(AttentionGradArgs {
            grad_key: &gk16.view,
            ..base
        }),
        "grad_key"
    );
    let gv4 = f32_buf(&[1, 2, 4, 6]);
    assert_eq!(
        bad(AttentionGradArgs {
            grad_value: &gv4.view,
            ..base
        }),
        "grad_value"
    );
    let bias = f32_buf(&[2, 3, 5]);
    assert_eq!(
        bad(AttentionGradArgs {
            bias: Some(&bias.view),
            ..base
        }),
        "bias"
    );
    let s2 = f32_buf(&[2]);
    assert_eq!(
        bad(AttentionGradArgs {
            sinks: Some(&s2.view),
            ..base
        }),
        "sinks"
    );
    let gs = f32_buf(&[4]);
    assert_eq!(
        bad(AttentionGradArgs {
            grad_sinks: Some(&gs.view),
            ..base
        }),
        "grad_sinks"
    );
    assert_eq!(
        bad(AttentionGradArgs {
            sinks: Some(&sinks.view),
            grad_sinks: Some(&s2.view),
            ..base
        }),
        "grad_sinks"
    );
    let gb = f32_buf(&[1, 4, 3, 4]);
    assert_eq!(
        bad(AttentionGradArgs {
            grad_bias: Some(&gb.view),
            ..base
        }),
        "grad_bias"
    );
    assert_eq!(
        bad(AttentionGradArgs {
            scale: f64::NAN,
            ..base
        }),
        "scale"
    );
    assert_eq!(
        bad(AttentionGradArgs {
            softcap: Some(-1.0),
            ..base
        }),
        "softcap"
    );
    // Gradients aliasing inputs, each other, or themselves.
    assert_eq!(
        bad(AttentionGradArgs {
            grad_query: &q.view,
            ..base
        }),
        "grad_query"
    );
    let gk_alias = Buf::new(DType::F32, &[1, 2, 5, 8], Layout::Contiguous, &[0.0; 80]);
    // SAFETY: the view covers the first 60 of the 80 elements of `gk_alias`.
    let gk6 = unsafe {
        TensorView::new(
            gk_alias.view.as_ptr(),
            DType::F32,
            vec![1, 2, 5, 6],
            vec![30, 15, 3, 1],
        )
    }
    .unwrap();
    assert_eq!(
        bad(AttentionGradArgs {
            grad_key: &gk_alias.view,
            grad_value: &gk6,
            ..base
        }),
        "grad_value"
    );
    let gq_b = Buf::nan(DType::F32, &[1, 4, 3, 8], Layout::Broadcast(1));
    assert_eq!(
        bad(AttentionGradArgs {
            grad_query: &gq_b.view,
            ..base
        }),
        "grad_query"
    );
    let qi = Buf::new(DType::I32, &[1, 4, 3, 8], Layout::Contiguous, &[]);
    assert!(matches!(
        attention_backward(&AttentionGradArgs {
            query: &qi.view,
            ..base
        }),
        Err(Error::Dtype { .. })
    ));
    let isa = Isa::get();
    if !isa.avx512f {
        assert!(matches!(
            attention_backward_with(&base, Backend::Avx512),
            Err(Error::Unsupported(_))
        ));
    }
}

/// Wide key tiles where they waste little: no mask and causal masks take 128, a sliding window keeps 64.
#[test]
fn kv_tile_width_follows_the_masks_waste() {
    use crate::mask::{MaskExpr, PlacedMask};
    let dims = |q: usize, k: usize| Dims {
        b: 1,
        h: 4,
        hkv: 2,
        g: 2,
        q,
        k,
        d: 64,
        dv: 64,
    };
    assert_eq!(kv_tile_width(&NoMask, &dims(2048, 2048)), BK_MAX);
    assert_eq!(kv_tile_width(&causal(0), &dims(2048, 2048)), BK_MAX);
    let window = PlacedMask::new(MaskExpr::sliding_window(512, true).unwrap(), 0, 0);
    assert_eq!(kv_tile_width(&window, &dims(2048, 2048)), BK_MIN);
    assert_eq!(kv_tile_width(&NoMask, &dims(0, 2048)), BK_MIN);
}
