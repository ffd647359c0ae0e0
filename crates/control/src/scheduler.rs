//! Placement: which node runs a new instance. A pure function over a node table: best fit by
//! the scarcer resource (bin packing), preferring nodes that already hold the image; refuses
//! with the reason when nothing fits.

use ferry_api::{Cpu, Memory};

/// What the scheduler knows of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCapacity {
    pub name: String,
    pub cpu_allocatable: Cpu,
    pub memory_allocatable: Memory,
    pub cpu_used: Cpu,
    pub memory_used: Memory,
    /// Image manifest digests cached on the node.
    pub cached_images: Vec<String>,
    /// Nodes that are draining or unreachable take nothing new.
    pub schedulable: bool,
}

impl NodeCapacity {
    fn free_cpu(&self) -> u64 {
        u64::from(self.cpu_allocatable.millis()).saturating_sub(u64::from(self.cpu_used.millis()))
    }
    fn free_memory(&self) -> u64 {
        self.memory_allocatable
            .bytes()
            .saturating_sub(self.memory_used.bytes())
    }
}

/// What one instance asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    pub cpu: Cpu,
    pub memory: Memory,
    pub image_digest: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no nodes have joined")]
    NoNodes,
    #[error(
        "no node has {cpu} CPU and {memory} memory free (most free: {best_cpu} CPU, {best_memory} memory)"
    )]
    Insufficient {
        cpu: Cpu,
        memory: Memory,
        best_cpu: Cpu,
        best_memory: Memory,
    },
}

/// Picks the node for `req`: among nodes where it fits, the one with the image cached first,
/// then the tightest fit (least free capacity left, as a fraction of the node, on the scarcer
/// resource), then by name for determinism.
pub fn place<'n>(
    nodes: &'n [NodeCapacity],
    req: &Request<'_>,
) -> Result<&'n NodeCapacity, Refusal> {
    let schedulable: Vec<&NodeCapacity> = nodes.iter().filter(|n| n.schedulable).collect();
    if schedulable.is_empty() {
        return Err(Refusal::NoNodes);
    }
    let (cpu, mem) = (u64::from(req.cpu.millis()), req.memory.bytes());
    let fits = |n: &&&NodeCapacity| n.free_cpu() >= cpu && n.free_memory() >= mem;
    let best = schedulable.iter().filter(fits).min_by(|a, b| {
        let cached = |n: &NodeCapacity| !n.cached_images.iter().any(|d| d == req.image_digest);
        // Leftover fraction on the scarcer dimension, in parts per million (integers only).
        let left = |n: &NodeCapacity| {
            let c = (n.free_cpu() - cpu) * 1_000_000 / u64::from(n.cpu_allocatable.millis()).max(1);
            let m = (n.free_memory() - mem) * 1_000_000 / n.memory_allocatable.bytes().max(1);
            c.min(m)
        };
        (cached(a), left(a), &a.name).cmp(&(cached(b), left(b), &b.name))
    });
    match best {
        Some(n) => Ok(n),
        None => {
            let best_cpu = schedulable.iter().map(|n| n.free_cpu()).max().unwrap_or(0);
            let best_mem = schedulable
                .iter()
                .map(|n| n.free_memory())
                .max()
                .unwrap_or(0);
            Err(Refusal::Insufficient {
                cpu: req.cpu,
                memory: req.memory,
                best_cpu: Cpu(u32::try_from(best_cpu).unwrap_or(u32::MAX)),
                best_memory: Memory(best_mem),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node(name: &str, cpu: u32, mem_mib: u64, used_cpu: u32, used_mib: u64) -> NodeCapacity {
        NodeCapacity {
            name: name.into(),
            cpu_allocatable: Cpu(cpu),
            memory_allocatable: Memory(mem_mib << 20),
            cpu_used: Cpu(used_cpu),
            memory_used: Memory(used_mib << 20),
            cached_images: vec![],
            schedulable: true,
        }
    }

    fn req(cpu: u32, mib: u64) -> Request<'static> {
        Request {
            cpu: Cpu(cpu),
            memory: Memory(mib << 20),
            image_digest: "sha256:a",
        }
    }

    #[test]
    fn best_fit_and_cache_preference() {
        let nodes = vec![
            node("big", 8000, 16384, 0, 0),
            node("tight", 2000, 2048, 1000, 1024),
        ];
        assert_eq!(place(&nodes, &req(1000, 1024)).unwrap().name, "tight");
        let mut nodes = nodes;
        nodes[0].cached_images.push("sha256:a".into());
        assert_eq!(place(&nodes, &req(1000, 1024)).unwrap().name, "big");
    }

    #[test]
    fn refuses_with_reason() {
        assert_eq!(place(&[], &req(1, 1)), Err(Refusal::NoNodes));
        let nodes = vec![node("a", 1000, 512, 0, 0)];
        let e = place(&nodes, &req(2000, 256)).unwrap_err();
        assert!(e.to_string().contains("most free: 1 CPU"), "{e}");
    }

    proptest! {
        #[test]
        fn placement_always_fits_and_never_misses_a_fit(
            nodes in proptest::collection::vec((1u32..16_000, 64u64..65_536, 0u32..16_000, 0u64..65_536, any::<bool>()), 0..40),
            cpu in 1u32..8000, mib in 1u64..16_384,
        ) {
            let nodes: Vec<NodeCapacity> = nodes.iter().enumerate().map(|(i, &(c, m, uc, um, s))| {
                let mut n = node(&format!("n{i}"), c, m, uc.min(c), um.min(m));
                n.schedulable = s;
                n
            }).collect();
            let r = req(cpu, mib);
            let any_fits = nodes.iter().any(|n| n.schedulable && n.free_cpu() >= u64::from(cpu) && n.free_memory() >= mib << 20);
            match place(&nodes, &r) {
                Ok(n) => {
                    prop_assert!(n.schedulable);
                    prop_assert!(n.free_cpu() >= u64::from(cpu) && n.free_memory() >= mib << 20);
                }
                Err(_) => prop_assert!(!any_fits),
            }
        }
    }
}
