//! Pure parsers for what the testapp reports about its sandbox: `/proc/self/mountinfo`,
//! `/proc/self/status` (capabilities, seccomp), `/proc/self/cgroup` and the cgroup limit files.
//! Everything here takes text (or a root directory) so unit tests drive it without a container.

use serde_json::{Map, Value, json};
use std::path::{Path, PathBuf};

/// Capability names by bit number (linux/capability.h).
pub const CAP_NAMES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// Names of the capabilities set in a hex mask as printed in `/proc/self/status` (`CapEff:`).
/// Unknown bits are named `cap_<bit>`. `None` when the text is not hex.
pub fn decode_caps(hex: &str) -> Option<Vec<String>> {
    let mask = u64::from_str_radix(hex.trim(), 16).ok()?;
    Some(
        (0..64)
            .filter(|bit| mask & (1u64 << bit) != 0)
            .map(|bit| {
                CAP_NAMES
                    .get(bit)
                    .map_or_else(|| format!("cap_{bit}"), |n| (*n).to_string())
            })
            .collect(),
    )
}

/// The `Key:\tvalue` fields of `/proc/self/status`, in order.
pub fn parse_status(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn status_field<'a>(fields: &'a [(String, String)], key: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// `/caps` body: the capability sets (hex and decoded), NoNewPrivs and the seccomp mode.
pub fn caps_report(status: &str) -> Value {
    let fields = parse_status(status);
    let mut out = Map::new();
    for key in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        if let Some(v) = status_field(&fields, key) {
            out.insert(key.to_string(), json!(v));
            out.insert(format!("{key}_names"), json!(decode_caps(v)));
        }
    }
    for key in ["NoNewPrivs", "Seccomp", "Seccomp_filters"] {
        if let Some(v) = status_field(&fields, key) {
            out.insert(key.to_string(), json!(v));
        }
    }
    Value::Object(out)
}

/// `/seccomp` body: the raw `Seccomp` field, its meaning, and the filter count.
pub fn seccomp_report(status: &str) -> Value {
    let fields = parse_status(status);
    let mode = status_field(&fields, "Seccomp");
    let name = match mode {
        Some("0") => "disabled",
        Some("1") => "strict",
        Some("2") => "filter",
        Some(_) => "unknown",
        None => "unsupported",
    };
    json!({
        "Seccomp": mode,
        "mode": name,
        "Seccomp_filters": status_field(&fields, "Seccomp_filters"),
        "NoNewPrivs": status_field(&fields, "NoNewPrivs"),
    })
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    pub mount_id: u64,
    pub parent_id: u64,
    pub major_minor: String,
    pub root: String,
    pub mount_point: String,
    pub options: String,
    pub optional: Vec<String>,
    pub fs_type: String,
    pub source: String,
    pub super_options: String,
}

impl MountInfo {
    pub fn to_json(&self) -> Value {
        json!({
            "mount_id": self.mount_id,
            "parent_id": self.parent_id,
            "major_minor": self.major_minor,
            "root": self.root,
            "mount_point": self.mount_point,
            "options": self.options,
            "optional": self.optional,
            "fs_type": self.fs_type,
            "source": self.source,
            "super_options": self.super_options,
        })
    }
}

/// Undoes the kernel's octal escapes in mountinfo paths (`\040` is a space).
pub fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') as u32 * 64
                + (bytes[i + 2] - b'0') as u32 * 8
                + (bytes[i + 3] - b'0') as u32;
            if let Ok(b) = u8::try_from(v) {
                out.push(b);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses one mountinfo line; `None` when it does not have the documented shape.
pub fn parse_mountinfo_line(line: &str) -> Option<MountInfo> {
    let (left, right) = line.split_once(" - ")?;
    let mut l = left.split(' ');
    let mount_id = l.next()?.parse().ok()?;
    let parent_id = l.next()?.parse().ok()?;
    let major_minor = l.next()?.to_string();
    let root = unescape_octal(l.next()?);
    let mount_point = unescape_octal(l.next()?);
    let options = l.next()?.to_string();
    let optional = l.filter(|s| !s.is_empty()).map(str::to_string).collect();
    let mut r = right.splitn(3, ' ');
    let fs_type = r.next()?.to_string();
    let source = unescape_octal(r.next()?);
    let super_options = r.next().unwrap_or("").to_string();
    Some(MountInfo {
        mount_id,
        parent_id,
        major_minor,
        root,
        mount_point,
        options,
        optional,
        fs_type,
        source,
        super_options,
    })
}

/// Parses all of `/proc/self/mountinfo`, skipping malformed lines.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines().filter_map(parse_mountinfo_line).collect()
}

/// One line of `/proc/self/cgroup`: `hierarchy-id:controllers:path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupLine {
    pub hierarchy: u32,
    pub controllers: Vec<String>,
    pub path: String,
}

pub fn parse_proc_cgroup(text: &str) -> Vec<CgroupLine> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let hierarchy = parts.next()?.parse().ok()?;
            let controllers = parts
                .next()?
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            let path = parts.next()?.to_string();
            Some(CgroupLine {
                hierarchy,
                controllers,
                path,
            })
        })
        .collect()
}

/// v1 memory limits print "unlimited" as a huge page-aligned number; anything at or above
/// 2^60 bytes is treated as no limit.
const V1_UNLIMITED: u64 = 1 << 60;

/// A v1 `memory.limit_in_bytes` or `pids.max`-style value: `None` for unlimited or unparsable.
pub fn parse_limit(raw: &str) -> Option<u64> {
    let raw = raw.trim();
    if raw == "max" {
        return None;
    }
    raw.parse::<u64>().ok().filter(|v| *v < V1_UNLIMITED)
}

/// v1 `cpu.cfs_quota_us`: `-1` means no quota.
pub fn parse_v1_quota(raw: &str) -> Option<u64> {
    raw.trim()
        .parse::<i64>()
        .ok()
        .and_then(|v| u64::try_from(v).ok())
}

/// v2 `cpu.max`: `"<quota|max> <period>"` → (quota, period).
pub fn parse_cpu_max(raw: &str) -> (Option<u64>, Option<u64>) {
    let mut it = raw.split_whitespace();
    let quota = it.next().and_then(|q| q.parse().ok());
    let period = it.next().and_then(|p| p.parse().ok());
    (quota, period)
}

/// Which cgroup layout is mounted at `root`.
pub fn cgroup_version(root: &Path) -> &'static str {
    if root.join("cgroup.controllers").exists() {
        "v2"
    } else if root.join("unified").join("cgroup.controllers").exists() && has_v1(root) {
        "hybrid"
    } else if has_v1(root) {
        "v1"
    } else {
        "none"
    }
}

fn has_v1(root: &Path) -> bool {
    ["memory", "cpu", "pids", "cpu,cpuacct"]
        .iter()
        .any(|c| root.join(c).is_dir())
}

/// Reads the first existing file of `candidates`, returning (path, trimmed contents).
fn read_first(candidates: &[PathBuf]) -> Option<(PathBuf, String)> {
    candidates.iter().find_map(|p| {
        std::fs::read_to_string(p)
            .ok()
            .map(|s| (p.clone(), s.trim().to_string()))
    })
}

fn relative(path: &str) -> &str {
    path.trim_start_matches('/')
}

/// Candidate locations of a v1 controller file: own cgroup path first (no cgroup namespace),
/// then the mount root (cgroup namespace, or the container's cgroup bind-mounted at the root).
fn v1_candidates(root: &Path, lines: &[CgroupLine], controller: &str, file: &str) -> Vec<PathBuf> {
    let dirs: Vec<PathBuf> = if controller == "cpu" {
        vec![root.join("cpu"), root.join("cpu,cpuacct")]
    } else {
        vec![root.join(controller)]
    };
    let own = lines
        .iter()
        .find(|l| l.controllers.iter().any(|c| c == controller))
        .map(|l| relative(&l.path));
    let mut out = Vec::new();
    for dir in &dirs {
        if let Some(p) = own.filter(|p| !p.is_empty()) {
            out.push(dir.join(p).join(file));
        }
        out.push(dir.join(file));
    }
    out
}

fn v2_candidates(base: &Path, lines: &[CgroupLine], file: &str) -> Vec<PathBuf> {
    let own = lines
        .iter()
        .find(|l| l.hierarchy == 0)
        .map(|l| relative(&l.path));
    let mut out = Vec::new();
    if let Some(p) = own.filter(|p| !p.is_empty()) {
        out.push(base.join(p).join(file));
    }
    out.push(base.join(file));
    out
}

/// `/cgroup` body: the process's limits read from the cgroup filesystem mounted at `root`
/// (normally `/sys/fs/cgroup`). Missing files give `null`, never an error.
pub fn cgroup_report(root: &Path, proc_self_cgroup: &str) -> Value {
    let lines = parse_proc_cgroup(proc_self_cgroup);
    let version = cgroup_version(root);
    let mut files = Map::new();
    let mut raw = Map::new();
    let mut read = |key: &str, candidates: Vec<PathBuf>| -> Option<String> {
        let (path, value) = read_first(&candidates)?;
        files.insert(key.to_string(), json!(path.display().to_string()));
        raw.insert(key.to_string(), json!(value));
        Some(value)
    };
    let (memory_limit, memory_usage, cpu_quota, cpu_period, cpu_weight, pids_max);
    if version == "v2" {
        memory_limit = read("memory_limit", v2_candidates(root, &lines, "memory.max"))
            .and_then(|v| parse_limit(&v));
        memory_usage = read(
            "memory_usage",
            v2_candidates(root, &lines, "memory.current"),
        )
        .and_then(|v| parse_limit(&v));
        let cpu_max = read("cpu_max", v2_candidates(root, &lines, "cpu.max"));
        (cpu_quota, cpu_period) = cpu_max
            .as_deref()
            .map(parse_cpu_max)
            .unwrap_or((None, None));
        cpu_weight = read("cpu_weight", v2_candidates(root, &lines, "cpu.weight"))
            .and_then(|v| v.parse::<u64>().ok());
        pids_max =
            read("pids_max", v2_candidates(root, &lines, "pids.max")).and_then(|v| parse_limit(&v));
    } else {
        memory_limit = read(
            "memory_limit",
            v1_candidates(root, &lines, "memory", "memory.limit_in_bytes"),
        )
        .and_then(|v| parse_limit(&v));
        memory_usage = read(
            "memory_usage",
            v1_candidates(root, &lines, "memory", "memory.usage_in_bytes"),
        )
        .and_then(|v| parse_limit(&v));
        cpu_quota = read(
            "cpu_quota",
            v1_candidates(root, &lines, "cpu", "cpu.cfs_quota_us"),
        )
        .and_then(|v| parse_v1_quota(&v));
        cpu_period = read(
            "cpu_period",
            v1_candidates(root, &lines, "cpu", "cpu.cfs_period_us"),
        )
        .and_then(|v| v.parse::<u64>().ok());
        cpu_weight = read(
            "cpu_shares",
            v1_candidates(root, &lines, "cpu", "cpu.shares"),
        )
        .and_then(|v| v.parse::<u64>().ok());
        pids_max = read("pids_max", v1_candidates(root, &lines, "pids", "pids.max"))
            .and_then(|v| parse_limit(&v));
    }
    let cpu_millicores = match (cpu_quota, cpu_period) {
        (Some(q), Some(p)) if p > 0 => Some(q * 1000 / p),
        _ => None,
    };
    json!({
        "version": version,
        "memory_limit_bytes": memory_limit,
        "memory_usage_bytes": memory_usage,
        "cpu_quota_us": cpu_quota,
        "cpu_period_us": cpu_period,
        "cpu_limit_millicores": cpu_millicores,
        if version == "v2" { "cpu_weight" } else { "cpu_shares" }: cpu_weight,
        "pids_max": pids_max,
        "files": files,
        "raw": raw,
        "proc_self_cgroup": proc_self_cgroup,
    })
}

/// The file a `/try?op=cgroup_write` attempt writes: a limit file of the process's own cgroup.
pub fn cgroup_limit_files(root: &Path, proc_self_cgroup: &str) -> Vec<PathBuf> {
    let lines = parse_proc_cgroup(proc_self_cgroup);
    let mut out = Vec::new();
    if cgroup_version(root) == "v2" {
        for f in ["memory.max", "cpu.max", "pids.max"] {
            out.extend(v2_candidates(root, &lines, f));
        }
    } else {
        out.extend(v1_candidates(
            root,
            &lines,
            "memory",
            "memory.limit_in_bytes",
        ));
        out.extend(v1_candidates(root, &lines, "cpu", "cpu.cfs_quota_us"));
        out.extend(v1_candidates(root, &lines, "pids", "pids.max"));
    }
    out.into_iter().filter(|p| p.exists()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_decode_names_bits() {
        assert_eq!(
            decode_caps("0000000000000000").unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(decode_caps("0000000000000001").unwrap(), vec!["CAP_CHOWN"]);
        let all = decode_caps("000001ffffffffff").unwrap();
        assert_eq!(all.len(), 41);
        assert_eq!(all[21], "CAP_SYS_ADMIN");
        assert_eq!(decode_caps("8000000000000000").unwrap(), vec!["cap_63"]);
        assert!(decode_caps("xyz").is_none());
    }

    const STATUS: &str = "Name:\ttestapp\nUmask:\t0022\nCapInh:\t0000000000000000\nCapPrm:\t00000000a80425fb\n\
CapEff:\t00000000a80425fb\nCapBnd:\t00000000a80425fb\nCapAmb:\t0000000000000000\nNoNewPrivs:\t1\n\
Seccomp:\t2\nSeccomp_filters:\t1\n";

    #[test]
    fn caps_and_seccomp_reports() {
        let caps = caps_report(STATUS);
        assert_eq!(caps["CapEff"], "00000000a80425fb");
        let names: Vec<String> = serde_json::from_value(caps["CapEff_names"].clone()).unwrap();
        assert!(names.contains(&"CAP_NET_BIND_SERVICE".to_string()));
        assert!(!names.contains(&"CAP_SYS_ADMIN".to_string()));
        assert_eq!(caps["NoNewPrivs"], "1");
        let sc = seccomp_report(STATUS);
        assert_eq!(sc["Seccomp"], "2");
        assert_eq!(sc["mode"], "filter");
        assert_eq!(sc["Seccomp_filters"], "1");
        assert_eq!(seccomp_report("Name:\tx\n")["mode"], "unsupported");
    }

    #[test]
    fn mountinfo_lines_parse() {
        let line = "36 35 98:0 /mnt1 /mnt\\040two rw,noatime master:1 shared:2 - ext3 /dev/root rw,errors=continue";
        let m = parse_mountinfo_line(line).unwrap();
        assert_eq!(m.mount_id, 36);
        assert_eq!(m.parent_id, 35);
        assert_eq!(m.root, "/mnt1");
        assert_eq!(m.mount_point, "/mnt two");
        assert_eq!(m.optional, vec!["master:1", "shared:2"]);
        assert_eq!(m.fs_type, "ext3");
        assert_eq!(m.source, "/dev/root");
        assert_eq!(m.super_options, "rw,errors=continue");
        let t =
            parse_mountinfo_line("22 1 0:21 / /tmp rw,nosuid - tmpfs tmpfs rw,mode=1777").unwrap();
        assert!(t.optional.is_empty());
        assert_eq!(t.fs_type, "tmpfs");
        assert!(parse_mountinfo_line("garbage").is_none());
        assert!(parse_mountinfo_line("x 1 0:1 / / rw - a b c").is_none());
        assert_eq!(
            parse_mountinfo("garbage\n22 1 0:21 / /tmp rw - tmpfs tmpfs rw\n").len(),
            1
        );
    }

    #[test]
    fn octal_unescape_edges() {
        assert_eq!(unescape_octal("a\\040b\\011c"), "a b\tc");
        assert_eq!(unescape_octal("trailing\\04"), "trailing\\04");
        assert_eq!(unescape_octal("\\\\x"), "\\\\x");
        assert_eq!(unescape_octal("\\777"), "\\777");
    }

    #[test]
    fn limits_parse() {
        assert_eq!(parse_limit("max"), None);
        assert_eq!(parse_limit("67108864\n"), Some(67108864));
        assert_eq!(parse_limit("9223372036854771712"), None);
        assert_eq!(parse_limit("junk"), None);
        assert_eq!(parse_v1_quota("-1"), None);
        assert_eq!(parse_v1_quota("50000"), Some(50000));
        assert_eq!(parse_cpu_max("max 100000"), (None, Some(100000)));
        assert_eq!(parse_cpu_max("50000 100000\n"), (Some(50000), Some(100000)));
        assert_eq!(parse_cpu_max(""), (None, None));
    }

    #[test]
    fn proc_cgroup_parses_v1_and_v2() {
        let v = parse_proc_cgroup("12:pids:/ferry/a\n4:cpu,cpuacct:/ferry/a\n0::/\nbad\n");
        assert_eq!(v.len(), 3);
        assert_eq!(v[1].controllers, vec!["cpu", "cpuacct"]);
        assert_eq!(v[2].hierarchy, 0);
        assert!(v[2].controllers.is_empty());
    }

    fn write(p: &Path, s: &str) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, s).unwrap();
    }

    #[test]
    fn cgroup_report_v1_prefers_own_path_and_tolerates_missing_files() {
        let dir = std::env::temp_dir().join(format!("testapp-cg1-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        write(
            &dir.join("memory/memory.limit_in_bytes"),
            "9223372036854771712\n",
        );
        write(
            &dir.join("memory/ferry/a/memory.limit_in_bytes"),
            "268435456\n",
        );
        write(&dir.join("cpu/cpu.cfs_quota_us"), "50000\n");
        write(&dir.join("cpu/cpu.cfs_period_us"), "100000\n");
        std::fs::create_dir_all(dir.join("unified")).unwrap();
        let r = cgroup_report(&dir, "7:memory:/ferry/a\n4:cpu,cpuacct:/\n");
        assert_eq!(r["version"], "v1");
        assert_eq!(r["memory_limit_bytes"], 268435456);
        assert_eq!(r["cpu_quota_us"], 50000);
        assert_eq!(r["cpu_limit_millicores"], 500);
        assert!(r["pids_max"].is_null());
        assert!(r["files"].get("pids_max").is_none());
        let files = cgroup_limit_files(&dir, "7:memory:/ferry/a\n");
        assert_eq!(files[0], dir.join("memory/ferry/a/memory.limit_in_bytes"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cgroup_report_v2_and_none() {
        let dir = std::env::temp_dir().join(format!("testapp-cg2-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        write(&dir.join("cgroup.controllers"), "cpu memory pids\n");
        write(&dir.join("memory.max"), "134217728\n");
        write(&dir.join("cpu.max"), "max 100000\n");
        write(&dir.join("pids.max"), "64\n");
        let r = cgroup_report(&dir, "0::/\n");
        assert_eq!(r["version"], "v2");
        assert_eq!(r["memory_limit_bytes"], 134217728);
        assert!(r["cpu_quota_us"].is_null());
        assert_eq!(r["cpu_period_us"], 100000);
        assert_eq!(r["pids_max"], 64);
        std::fs::remove_dir_all(&dir).unwrap();
        let none = cgroup_report(Path::new("/nonexistent/testapp"), "");
        assert_eq!(none["version"], "none");
        assert!(none["memory_limit_bytes"].is_null());
    }
}
