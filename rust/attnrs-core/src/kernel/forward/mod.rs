//! The forward pass: from validated arguments to the typed [`tile::Job`], then prefill ([`prefill`]) or
//! split-KV decode ([`split_kv`]) on the micro-kernel family `select!` picks.

#[cfg(target_arch = "x86_64")]
pub(crate) mod decode_avx512;
mod item;
mod prefill;
mod split_kv;
pub(crate) mod tile;

pub(crate) use tile::ROWS;

use super::AttentionArgs;
use super::args::Checked;
use super::dispatch::{Backend, select};
use super::dropout::DropMask;
use super::score::AnyTerms;
use super::strided::{BiasRef, Strided, read_sinks};
use crate::tensor::Float;
use crate::{Result, threads};
use item::Entry;
use tile::{Job, round_up};

/// Validated arguments in, output written.
/// `rows` is the number of query rows (all heads of a group) a work item aims for ([`ROWS`]; tests shrink it).
pub(crate) fn run(
    args: &AttentionArgs,
    plan: &Checked,
    backend: Backend,
    rows: usize,
) -> Result<()> {
    select!(plan.dtype, backend, go(args, plan, rows))
}

/// Runs the call with kernel family `K` on inputs of type `T`. Only called with a `K` whose features the CPU
/// has (see `select!`).
fn go<K: Entry, T: Float>(args: &AttentionArgs, plan: &Checked, rows: usize) -> Result<()> {
    let dims = plan.dims;
    let bq = rows.div_ceil(dims.g).clamp(1, dims.q.max(1));
    let job = Job::<T> {
        dims,
        q: Strided::of(args.query),
        k: Strided::of(args.key),
        v: Strided::of(args.value),
        out: Strided::of(args.out),
        lse: args.lse.map(|t| {
            let mut s = Strided::of(t);
            s.st[3] = 0;
            s
        }),
        bias: args.bias.zip(plan.bias_strides).map(|(t, st)| BiasRef {
            ptr: t.as_ptr(),
            dtype: t.dtype(),
            st,
        }),
        sinks: args.sinks.map(read_sinks),
        mask: args.mask,
        scale: plan.scale,
        softcap: plan.softcap,
        terms: AnyTerms::new::<K::A>(&args.score, &dims)?,
        drop: DropMask::new(args.dropout, dims.h, dims.q),
        bq,
        dp: round_up(dims.d, 2),
        dvp: round_up(dims.dv, 16),
    };
    threads::install(plan.threads, || {
        if job.nqb() == 1 {
            split_kv::decode::<K, T>(&job, plan.threads)
        } else {
            prefill::prefill::<K, T>(&job)
        }
    })
}
