//! Free capacity of this node, NSDb's way: each figure in [0, 1], 1 = all free.
//! disk = free/total of the data dir's disk; heap = available/total memory;
//! cpu = 1 − busy fraction; load = 1 − min(1, load1/cores); mix = their mean.
//! The probe is a trait so the simulator can script it; production reads `sysinfo`.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Capacity {
    pub heap: f64,
    pub load: f64,
    pub cpu: f64,
    pub disk: f64,
    pub mix: f64,
}

fn fraction(free: f64, total: f64) -> f64 {
    if total > 0.0 && free.is_finite() { (free / total).clamp(0.0, 1.0) } else { 0.0 }
}

impl Capacity {
    /// Builds a capacity from raw readings with NSDb's formulas.
    pub fn from_readings(
        mem_available: u64,
        mem_total: u64,
        cpu_busy_percent: f64,
        load1: f64,
        cores: usize,
        disk_free: u64,
        disk_total: u64,
    ) -> Self {
        let heap = fraction(mem_available as f64, mem_total as f64);
        let cpu = (1.0 - cpu_busy_percent / 100.0).clamp(0.0, 1.0);
        let load = if cores == 0 { 0.0 } else { 1.0 - (load1 / cores as f64).clamp(0.0, 1.0) };
        let disk = fraction(disk_free as f64, disk_total as f64);
        Self::new(heap, load, cpu, disk)
    }

    pub fn new(heap: f64, load: f64, cpu: f64, disk: f64) -> Self {
        Self { heap, load, cpu, disk, mix: (heap + load + cpu + disk) / 4.0 }
    }

    pub fn get(&self, selector: crate::config::Selector) -> f64 {
        use crate::config::Selector::*;
        match selector {
            Heap => self.heap,
            Load => self.load,
            Cpu => self.cpu,
            Disk => self.disk,
            Mix => self.mix,
        }
    }

    /// The compact gossip form: `heap,load,cpu,disk` with three decimals (mix is derived).
    pub fn to_gossip(&self) -> String {
        format!("{:.3},{:.3},{:.3},{:.3}", self.heap, self.load, self.cpu, self.disk)
    }

    pub fn from_gossip(s: &str) -> Option<Self> {
        let v: Vec<f64> = s.split(',').map(|x| x.parse().ok()).collect::<Option<_>>()?;
        match v.as_slice() {
            [h, l, c, d] if v.iter().all(|x| (0.0..=1.0).contains(x)) => Some(Self::new(*h, *l, *c, *d)),
            _ => None,
        }
    }
}

pub trait CapacityProbe: Send + 'static {
    fn sample(&mut self) -> Capacity;
}

/// Reads the machine through `sysinfo`; the disk is the one holding the data dir.
pub struct SysinfoProbe {
    data_dir: PathBuf,
    system: Option<sysinfo::System>,
}

impl SysinfoProbe {
    pub fn new(data_dir: &Path) -> Self {
        Self { data_dir: data_dir.to_path_buf(), system: sysinfo::System::new().ok() }
    }

    fn disk(&self) -> (u64, u64) {
        // Resolved at each sample: the data dir may not exist yet when the probe is built.
        let data_dir = self.data_dir.canonicalize().unwrap_or_else(|_| self.data_dir.clone());
        let Ok(disks) = sysinfo::Disks::new_with_refreshed_list() else { return (0, 0) };
        disks
            .iter()
            .filter(|d| data_dir.starts_with(d.mount_point()))
            .max_by_key(|d| d.mount_point().as_os_str().len())
            .map_or((0, 0), |d| (d.available_space(), d.total_space()))
    }
}

impl CapacityProbe for SysinfoProbe {
    fn sample(&mut self) -> Capacity {
        let (disk_free, disk_total) = self.disk();
        let load1 = sysinfo::System::load_average().map_or(0.0, |l| l.one);
        let Some(sys) = self.system.as_mut() else {
            return Capacity::from_readings(0, 0, 100.0, load1, 1, disk_free, disk_total);
        };
        sys.refresh_memory();
        // CPU usage is measured between two refreshes: the previous sample is the baseline.
        sys.refresh_cpu_usage();
        let cores = sys.cpus().len().max(1);
        Capacity::from_readings(
            sys.available_memory(),
            sys.total_memory(),
            f64::from(sys.global_cpu_usage()),
            load1,
            cores,
            disk_free,
            disk_total,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Selector;

    #[test]
    fn nsdb_formulas() {
        let c = Capacity::from_readings(4, 16, 25.0, 1.0, 4, 30, 100);
        assert_eq!((c.heap, c.cpu, c.load, c.disk), (0.25, 0.75, 0.75, 0.3));
        assert!((c.mix - (0.25 + 0.75 + 0.75 + 0.3) / 4.0).abs() < 1e-12);
        // Load above the core count saturates at no free capacity; bad totals read as full.
        let c = Capacity::from_readings(0, 0, 150.0, 9.0, 2, 5, 0);
        assert_eq!((c.heap, c.cpu, c.load, c.disk), (0.0, 0.0, 0.0, 0.0));
        assert_eq!(c.get(Selector::Mix), 0.0);
        let c = Capacity::new(0.1, 0.2, 0.3, 0.4);
        assert_eq!(
            [Selector::Heap, Selector::Load, Selector::Cpu, Selector::Disk].map(|s| c.get(s)),
            [0.1, 0.2, 0.3, 0.4]
        );
    }

    #[test]
    fn gossip_form_roundtrips_and_rejects_garbage() {
        let c = Capacity::new(0.5, 0.25, 1.0, 0.125);
        assert_eq!(Capacity::from_gossip(&c.to_gossip()), Some(c));
        assert_eq!(Capacity::from_gossip("1,2"), None);
        assert_eq!(Capacity::from_gossip("0.5,0.5,0.5,1.5"), None);
        assert_eq!(Capacity::from_gossip("a,b,c,d"), None);
    }

    #[test]
    fn sysinfo_probe_reads_values_in_range() {
        let dir = tempfile::tempdir().unwrap();
        let c = SysinfoProbe::new(dir.path()).sample();
        for v in [c.heap, c.load, c.cpu, c.disk, c.mix] {
            assert!((0.0..=1.0).contains(&v), "{c:?}");
        }
        assert!(c.disk > 0.0, "the data dir's disk must be found: {c:?}");
    }
}
