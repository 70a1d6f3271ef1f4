//! Name -> entry maps with Python `dict` semantics, safe to share between threads.
//!
//! The Python registries (`AttentionInterface`, `AttentionMaskInterface`) keep one global `Registry` per class
//! and one local `Registry` per instance; this type is the storage of both. Order is insertion order, and
//! re-assigning an existing name keeps its place, exactly as a `dict` does, so iteration over a registry
//! matches transformers' `GeneralInterface` element for element.
//!
//! Native kernels live in one more `Registry`, process-wide: [`kernels`] maps names to [`AttentionKernel`]s.
//! Rust code linked with attnrs-core adds its own with [`register_kernel`]; kernels from other shared
//! libraries arrive through the C ABI ([`crate::plugin::AbiKernel`]); the built-in CPU kernel is registered
//! the same way under [`BUILTIN_KERNEL`]. [`run_kernel`] checks a call against the kernel's declared
//! capabilities before running it, so a kernel never sees an input it did not declare.

use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use indexmap::IndexMap;

use crate::kernel::AttentionArgs;
use crate::tensor::DType;
use crate::{Error, Result};

/// The mask forms an attention entry accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MaskKind {
    /// No mask at all (plain attention, optionally `is_causal`).
    None,
    /// A dense boolean or additive tensor.
    Dense,
    /// A FlexAttention-style block-sparse layout.
    BlockSparse,
    /// An attnrs mask expression evaluated inside the kernel.
    Expression,
}

impl MaskKind {
    pub fn name(self) -> &'static str {
        match self {
            MaskKind::None => "none",
            MaskKind::Dense => "dense",
            MaskKind::BlockSparse => "block_sparse",
            MaskKind::Expression => "expression",
        }
    }
}

/// What an entry can do. An entry registered without capabilities is assumed to handle whatever it is given
/// (that is how transformers treats every registered function).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// Device types it runs on ("cpu", "cuda", ...); empty means any.
    pub devices: Vec<String>,
    /// Element types it accepts; empty means any.
    pub dtypes: Vec<DType>,
    /// Mask forms it accepts; empty means any.
    pub mask_kinds: Vec<MaskKind>,
    /// Whether it provides gradients.
    pub backward: bool,
    /// Whether it can return the log-sum-exp of each row.
    pub lse: bool,
}

impl Capabilities {
    /// True when `device` is listed (or any device is accepted).
    pub fn supports_device(&self, device: &str) -> bool {
        self.devices.is_empty() || self.devices.iter().any(|d| d == device)
    }
    /// True when `dtype` is listed (or any dtype is accepted).
    pub fn supports_dtype(&self, dtype: DType) -> bool {
        self.dtypes.is_empty() || self.dtypes.contains(&dtype)
    }
}

/// Optional inputs a native kernel handles beyond q, k, v, out, a mask and (see [`Capabilities::lse`]) lse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KernelFeatures {
    /// `softcap` (logit capping).
    pub softcap: bool,
    /// `sinks` (per-head logits in the softmax denominator).
    pub sinks: bool,
    /// An additive `bias`.
    pub bias: bool,
    /// Fewer kv heads than query heads.
    pub gqa: bool,
}

impl KernelFeatures {
    /// Every feature.
    pub const ALL: KernelFeatures = KernelFeatures {
        softcap: true,
        sinks: true,
        bias: true,
        gqa: true,
    };
}

/// A native attention kernel: computes [`AttentionArgs`] (the contract of [`crate::kernel`]) into `out`.
///
/// `forward` may be called from many threads at once. It is only called with inputs the kernel declared
/// ([`run_kernel`] checks dtypes, lse, masks and [`KernelFeatures`] first).
pub trait AttentionKernel: Send + Sync + std::fmt::Debug {
    /// Devices, dtypes, mask kinds, backward and lse.
    fn capabilities(&self) -> &Capabilities;
    /// Optional inputs it handles.
    fn features(&self) -> KernelFeatures;
    /// Where it comes from, for messages and `attnrs info` ("built in", "plugin 'x' (ABI v1)").
    fn origin(&self) -> String;
    /// Runs one call.
    fn forward(&self, args: &AttentionArgs<'_>) -> Result<()>;
}

/// A shared handle to a registered kernel.
pub type KernelRef = Arc<dyn AttentionKernel>;

/// The name of the built-in CPU kernel in [`kernels`].
pub const BUILTIN_KERNEL: &str = "attnrs";

/// The built-in CPU kernel ([`crate::kernel::attention_forward`]) as a registry entry.
#[derive(Debug)]
struct CpuKernel {
    capabilities: Capabilities,
}

impl AttentionKernel for CpuKernel {
    fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }
    fn features(&self) -> KernelFeatures {
        KernelFeatures::ALL
    }
    fn origin(&self) -> String {
        "built in (the attnrs CPU kernel)".to_owned()
    }
    fn forward(&self, args: &AttentionArgs<'_>) -> Result<()> {
        crate::kernel::attention_forward(args)
    }
}

/// The process-wide table of native kernels, created with the built-in CPU kernel under [`BUILTIN_KERNEL`].
pub fn kernels() -> &'static Registry<KernelRef> {
    static KERNELS: OnceLock<Registry<KernelRef>> = OnceLock::new();
    KERNELS.get_or_init(|| {
        let registry: Registry<KernelRef> = Registry::new();
        let builtin = CpuKernel {
            capabilities: Capabilities {
                devices: vec!["cpu".to_owned()],
                dtypes: vec![DType::F32, DType::BF16, DType::F16, DType::F64],
                mask_kinds: vec![
                    MaskKind::None,
                    MaskKind::Dense,
                    MaskKind::BlockSparse,
                    MaskKind::Expression,
                ],
                backward: false,
                lse: true,
            },
        };
        // The name is a non-empty literal, so insertion cannot fail.
        let _ = registry.insert(BUILTIN_KERNEL, Arc::new(builtin));
        registry
    })
}

/// Registers (or replaces) the native kernel `name`; returns the previous one.
pub fn register_kernel(name: &str, kernel: KernelRef) -> Result<Option<KernelRef>> {
    kernels().insert(name, kernel)
}

/// Checks that `kernel` declared everything this call needs. `masked` says whether a mask may hide pairs
/// (the call's [`MaskTiles`](crate::mask::tiles::MaskTiles) alone cannot tell).
pub fn check_call(
    name: &str,
    kernel: &dyn AttentionKernel,
    args: &AttentionArgs<'_>,
    masked: bool,
) -> Result<()> {
    let caps = kernel.capabilities();
    let features = kernel.features();
    let refuse = |what: String| Err(Error::Unsupported(format!("kernel '{name}' {what}")));
    if !caps.supports_device("cpu") {
        return refuse(format!(
            "runs on {:?}, and attnrs passes it CPU tensors only",
            caps.devices
        ));
    }
    let dtype = args.query.dtype();
    if !caps.supports_dtype(dtype) {
        let listed: Vec<_> = caps.dtypes.iter().map(|d| d.torch_name()).collect();
        return refuse(format!(
            "takes {listed:?}, got {} inputs",
            dtype.torch_name()
        ));
    }
    let masks_ok = caps.mask_kinds.is_empty()
        || caps.mask_kinds.iter().any(|k| {
            matches!(
                k,
                MaskKind::Dense | MaskKind::BlockSparse | MaskKind::Expression
            )
        });
    if masked && !masks_ok {
        return refuse("takes no masks, and this call has one".to_owned());
    }
    if args.lse.is_some() && !caps.lse {
        return refuse("does not compute the log-sum-exp (return_lse=True)".to_owned());
    }
    let optional = [
        // The kernel table's C ABI carries no score-mod terms: they run on the built-in kernel directly.
        (!args.score.is_empty(), "score_mod terms"),
        (args.softcap.is_some() && !features.softcap, "softcap"),
        (args.sinks.is_some() && !features.sinks, "sinks"),
        (
            args.bias.is_some() && !features.bias,
            "an additive mask or bias",
        ),
        (
            args.query.shape().get(1) != args.key.shape().get(1) && !features.gqa,
            "fewer kv heads than query heads (GQA)",
        ),
    ];
    if let Some((_, what)) = optional.iter().find(|(needed, _)| *needed) {
        return refuse(format!("does not support {what}"));
    }
    Ok(())
}

/// Looks `name` up in [`kernels`], checks the call against its capabilities ([`check_call`]) and runs it.
pub fn run_kernel(name: &str, args: &AttentionArgs<'_>, masked: bool) -> Result<()> {
    let kernel = kernels().lookup(name)?;
    check_call(name, kernel.as_ref(), args, masked)?;
    kernel.forward(args)
}

/// Checks that `name` can be a registry key.
pub fn validate_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::value("name", "a non-empty string", "''"));
    }
    Ok(())
}

/// An ordered, lock-protected `name -> V` map with `dict` semantics.
#[derive(Debug)]
pub struct Registry<V> {
    entries: RwLock<IndexMap<String, V>>,
}

impl<V> Default for Registry<V> {
    fn default() -> Self {
        Self {
            entries: RwLock::new(IndexMap::new()),
        }
    }
}

impl<V: Clone> Registry<V> {
    pub fn new() -> Self {
        Self::default()
    }

    // A panic while a lock is held cannot leave the map half-updated (every write is one IndexMap call),
    // so a poisoned lock is safe to keep using.
    fn read(&self) -> RwLockReadGuard<'_, IndexMap<String, V>> {
        self.entries.read().unwrap_or_else(|p| p.into_inner())
    }
    fn write(&self) -> RwLockWriteGuard<'_, IndexMap<String, V>> {
        self.entries.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The entry under `name`.
    pub fn get(&self, name: &str) -> Option<V> {
        self.read().get(name).cloned()
    }

    /// Sets `name`, keeping its position if it exists; returns the previous entry.
    pub fn insert(&self, name: &str, value: V) -> Result<Option<V>> {
        validate_name(name)?;
        Ok(self.write().insert(name.to_owned(), value))
    }

    /// Removes `name`, keeping the order of the others; returns the removed entry.
    pub fn remove(&self, name: &str) -> Option<V> {
        self.write().shift_remove(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.read().contains_key(name)
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// Names in insertion order (a snapshot).
    pub fn keys(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    /// `(name, entry)` pairs in insertion order (a snapshot).
    pub fn items(&self) -> Vec<(String, V)> {
        self.read()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn clear(&self) {
        self.write().clear();
    }

    /// Looks `name` up, or fails with the list of valid names.
    pub fn lookup(&self, name: &str) -> Result<V> {
        let entries = self.read();
        entries
            .get(name)
            .cloned()
            .ok_or_else(|| Error::UnknownName {
                name: name.to_owned(),
                valid: entries.keys().cloned().collect(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn dict_semantics() {
        let r = Registry::new();
        r.insert("a", 1).unwrap();
        r.insert("b", 2).unwrap();
        assert_eq!(r.insert("a", 3).unwrap(), Some(1));
        assert_eq!(r.keys(), ["a", "b"]); // re-assignment keeps the position
        assert_eq!(r.remove("a"), Some(3));
        r.insert("a", 4).unwrap();
        assert_eq!(r.keys(), ["b", "a"]); // re-insertion after removal goes last
        assert_eq!(r.remove("zzz"), None);
        assert!(matches!(r.insert("", 0), Err(Error::Value { .. })));
        assert_eq!(r.len(), 2);
        match r.lookup("nope") {
            Err(Error::UnknownName { valid, .. }) => assert_eq!(valid, ["b", "a"]),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn many_threads_register_and_look_up() {
        let r: Arc<Registry<usize>> = Arc::new(Registry::new());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let r = Arc::clone(&r);
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        let own = format!("t{t}-{}", i % 50);
                        r.insert(&own, t * 10_000 + i).unwrap();
                        let got = r.get(&own).expect("own entry vanished");
                        assert_eq!(got / 10_000, t, "another thread's value under our name");
                        r.insert("shared", i).unwrap();
                        if i % 3 == 0 {
                            r.remove(&own);
                        }
                        let keys = r.keys();
                        let unique: std::collections::HashSet<_> = keys.iter().collect();
                        assert_eq!(unique.len(), keys.len(), "duplicate keys in a snapshot");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(r.contains("shared"));
        // Every thread ends with i = 1999: names t{t}-{1999 % 50 = 49} were inserted last and not removed
        // (1999 % 3 != 0), so each thread's last entry survives.
        for t in 0..8 {
            assert_eq!(r.get(&format!("t{t}-49")), Some(t * 10_000 + 1999));
        }
    }
}
