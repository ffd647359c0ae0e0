//! The KPA-style scaling decision: a pure function of (metric history, now, config, the state
//! carried from the previous tick). The reconcile loop calls [`decide`] once per revision and
//! pass; nothing here does I/O or reads a clock.
//!
//! Per revision, every tick:
//! - each metric is a series of 1-second buckets holding the revision's total (the sum over
//!   its instances, or for latency the p99 times the ready count), with a per-instance target;
//! - per metric, the stable average over the stable window and the panic average over the
//!   panic window (a percentage of it, at least one bucket); buckets without a sample count as
//!   zero; wanted = ceil(average / target); the largest wanted of any metric counts;
//! - from zero ready instances the newest bucket counts at once (nothing absorbs a burst);
//! - panic mode starts when the panic-window demand reaches `panic_threshold` × ready, and
//!   lasts until it has been below that for a whole stable window; while panicking the count
//!   never goes down;
//! - per tick at most `max_scale_up_rate` × ready up, and down to ready / `max_scale_down_rate`;
//! - a scale-down delay: the count only falls to the largest wanted within the delay;
//! - scale to zero only after `scale_to_zero_grace_ms` without requests (the `activity`
//!   series), whatever resource metrics say; min/max always hold;
//! - anti-thrash ([`Thrash`]): more than `max_flips` reversals of direction within a window
//!   hold the window's peak count warm for a cooldown that doubles each time it engages again
//!   soon after the last, and relaxes when the load settles.

use std::collections::VecDeque;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub min: u32,
    pub max: u32,
    pub stable_window_ms: u64,
    /// The panic window as a percentage of the stable window.
    pub panic_window_pct: u64,
    /// Panic when panic-window demand / ready reaches this (2.0 = 200 %).
    pub panic_threshold: f64,
    /// At most this many times the ready count per tick (up), and down to ready / this.
    pub max_scale_up_rate: f64,
    pub max_scale_down_rate: f64,
    pub scale_down_delay_ms: u64,
    pub scale_to_zero_grace_ms: u64,
    pub thrash: ThrashConfig,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            min: 0,
            max: 10,
            stable_window_ms: 60_000,
            panic_window_pct: 10,
            panic_threshold: 2.0,
            max_scale_up_rate: 1000.0,
            max_scale_down_rate: 2.0,
            scale_down_delay_ms: 0,
            scale_to_zero_grace_ms: 30_000,
            thrash: ThrashConfig::default(),
        }
    }
}

impl Config {
    pub fn panic_window_ms(&self) -> u64 {
        (self.stable_window_ms * self.panic_window_pct / 100).max(1000)
    }
}

/// One 1-second bucket of one metric, ending at `at_ms`: the revision's total.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub at_ms: u64,
    pub value: f64,
}

/// One metric's history and its per-instance target.
#[derive(Debug, Clone, Copy)]
pub struct Series<'a> {
    pub label: &'a str,
    pub target: f64,
    pub samples: &'a [Sample],
    /// Whether this metric keeps instances without requests (custom metrics: a queue worker's
    /// backlog). Request and resource metrics do not: without requests for the grace, they
    /// let the revision go to zero.
    pub holds_when_idle: bool,
}

/// What one metric asks for this tick.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricDecision {
    pub label: String,
    pub target: f64,
    /// Averages of the revision's total over the stable and the panic window.
    pub stable: f64,
    pub panic: f64,
    pub want_stable: u32,
    pub want_panic: u32,
    pub holds_when_idle: bool,
}

/// What the scaler carries from one tick to the next.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScalerState {
    /// Set while panicking: since when, and the highest count decided during the panic.
    pub panic: Option<(u64, u32)>,
    /// Last time the panic-window demand was at the panic threshold.
    pub last_panic_signal_ms: u64,
    /// (time, wanted) inside the scale-down delay.
    pub recent: VecDeque<(u64, u32)>,
    pub thrash: Thrash,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub desired: u32,
    pub panicking: bool,
    /// The anti-thrash warm floor in force, when engaged.
    pub warm_floor: Option<u32>,
    pub metrics: Vec<MetricDecision>,
    pub reason: String,
}

/// The mean over the window's 1-second buckets, ending at the current second, or at the
/// previous one while the current second has not reported yet (a report covers the second
/// before it, so a short panic window would otherwise read zero at the start of every second).
/// Buckets without a sample count as zero load.
fn average(samples: &[Sample], now: u64, window: u64) -> f64 {
    let buckets = (window / 1000).max(1);
    let current = now / 1000 * 1000;
    let reported = samples
        .iter()
        .rev()
        .take_while(|s| s.at_ms >= current)
        .any(|s| s.at_ms >= current && s.at_ms <= now);
    let end = if reported {
        now
    } else {
        current.saturating_sub(1)
    };
    let from = end.saturating_sub(buckets * 1000);
    let (sum, n) = samples
        .iter()
        .filter(|s| s.at_ms > from && s.at_ms <= end)
        .fold((0.0, 0u64), |(s, n), x| (s + x.value.max(0.0), n + 1));
    if n == 0 {
        0.0
    } else {
        sum / buckets.max(n) as f64
    }
}

/// Wanted instances for `total` at a per-instance `target`.
fn want(total: f64, target: f64) -> u32 {
    let w = (total / target.max(1e-9)).ceil();
    if w.is_nan() || w <= 0.0 {
        0
    } else {
        w.min(f64::from(u32::MAX)) as u32
    }
}

/// How long after the start of an activity bucket the revision still counts as busy: the
/// bucket's second, then the second its report may take to arrive.
const ACTIVITY_SPAN_MS: u64 = 2_000;

/// Decides the instance count for one revision. `ready` is how many instances serve now;
/// `activity` holds the revision's request load (in flight + queued + requests), whose last
/// non-zero bucket starts the scale-to-zero grace.
pub fn decide(
    series: &[Series<'_>],
    activity: &[Sample],
    ready: u32,
    now: u64,
    cfg: &Config,
    st: &mut ScalerState,
) -> Decision {
    let panic_window = cfg.panic_window_ms();
    let mut metrics = Vec::with_capacity(series.len());
    for s in series {
        let stable = average(s.samples, now, cfg.stable_window_ms);
        let panic = average(s.samples, now, panic_window);
        let mut want_panic = want(panic, s.target);
        if ready == 0 {
            // From zero, the newest bucket decides at once.
            let newest = s
                .samples
                .iter()
                .filter(|x| x.at_ms <= now && x.at_ms + 2_000 > now)
                .map(|x| x.value)
                .fold(0.0, f64::max);
            want_panic = want_panic.max(want(newest, s.target));
        }
        metrics.push(MetricDecision {
            label: s.label.to_string(),
            target: s.target,
            stable,
            panic,
            want_stable: want(stable, s.target),
            want_panic,
            holds_when_idle: s.holds_when_idle,
        });
    }
    let top = |f: fn(&MetricDecision) -> u32| {
        metrics
            .iter()
            .max_by_key(|m| f(m))
            .map_or((0, "none"), |m| (f(m), m.label.as_str()))
    };
    let (want_stable, stable_label) = top(|m| m.want_stable);
    let (want_panic, panic_label) = top(|m| m.want_panic);
    let last_activity = activity
        .iter()
        .filter(|s| s.at_ms <= now && s.value > 0.0)
        .map(|s| s.at_ms)
        .max();

    // Rate bounds per tick, relative to what is ready.
    let base = f64::from(ready.max(1));
    let up_bound = (base * cfg.max_scale_up_rate.max(1.0))
        .ceil()
        .min(f64::from(u32::MAX)) as u32;
    let down_bound = (f64::from(ready) / cfg.max_scale_down_rate.max(1.0)).floor() as u32;
    let bound = |w: u32| w.min(up_bound).max(down_bound.min(w.max(down_bound)));

    // Panic mode.
    if want_panic > 0 && f64::from(want_panic) / base >= cfg.panic_threshold {
        st.last_panic_signal_ms = now;
        if st.panic.is_none() {
            st.panic = Some((now, ready));
        }
    } else if st.panic.is_some()
        && now.saturating_sub(st.last_panic_signal_ms) >= cfg.stable_window_ms
    {
        st.panic = None;
    }
    let mut desired;
    let mut reason;
    if let Some((since, high)) = st.panic {
        // Panicking scales by the short window, but never below what the stable window asks:
        // more load must not get fewer instances because it also tripped the panic threshold.
        let w = bound(want_panic).max(bound(want_stable)).max(high);
        st.panic = Some((since, w));
        desired = w;
        reason = format!(
            "panic: {panic_label} asks for {want_panic} over the last {} s (ready {ready})",
            panic_window / 1000
        );
    } else {
        desired = bound(want_stable);
        reason = format!(
            "stable: {stable_label} asks for {want_stable} over {} s",
            cfg.stable_window_ms / 1000
        );
    }

    // Scale-down delay: the largest wanted within the delay.
    st.recent.push_back((now, desired));
    while st
        .recent
        .front()
        .is_some_and(|(t, _)| now.saturating_sub(*t) > cfg.scale_down_delay_ms)
    {
        st.recent.pop_front();
    }
    if st.recent.len() > 1024 {
        st.recent.pop_front();
    }
    let delayed = st.recent.iter().map(|r| r.1).max().unwrap_or(0);
    if delayed > desired {
        reason = format!(
            "{reason}; held at {delayed} by the {} s scale-down delay",
            cfg.scale_down_delay_ms / 1000
        );
        desired = delayed;
    }

    // Scale to zero only after the grace without requests, and then whatever resources say.
    // The grace runs from the end of the last active bucket, plus the second its report may
    // take to come (stats cover the second before they arrive): until then the revision counts
    // as busy. Counted from the bucket's start, a revision serving without a pause was
    // already up to two seconds "idle" just before each report came, and a grace that short
    // scaled it to zero under load, then restarted it (and the flips engaged anti-thrash).
    let idle_for = match last_activity {
        None => Some(u64::MAX),
        Some(t) => now.checked_sub(t.saturating_add(ACTIVITY_SPAN_MS)),
    };
    if st.panic.is_none() {
        if idle_for.is_some_and(|i| i >= cfg.scale_to_zero_grace_ms) {
            let hold = metrics
                .iter()
                .filter(|m| m.holds_when_idle)
                .map(|m| m.want_stable)
                .max()
                .unwrap_or(0)
                .min(desired);
            if desired > hold {
                reason = format!(
                    "no requests for the {} s grace: to {hold}",
                    cfg.scale_to_zero_grace_ms / 1000
                );
            }
            desired = hold;
        } else if desired == 0 && ready > 0 {
            desired = 1;
            reason = format!(
                "idle for {} s, keeping one until the {} s grace",
                idle_for.unwrap_or(0) / 1000,
                cfg.scale_to_zero_grace_ms / 1000
            );
        }
    }

    // Requests wait and nothing is ready: at least one, whatever the metrics say (a service
    // that scales on CPU has no CPU figures before its first instance).
    if ready == 0
        && desired == 0
        && last_activity.is_some_and(|t| now.saturating_sub(t) < ACTIVITY_SPAN_MS)
    {
        desired = 1;
        reason = "requests wait and nothing is ready: starting one".to_string();
    }

    // Anti-thrash: a warm floor while engaged.
    let floor = st.thrash.floor(now);
    if let Some(f) = floor
        && f > desired
    {
        reason = format!(
            "{reason}; anti-thrash holds {f} warm (level {})",
            st.thrash.level
        );
        desired = f;
    }
    let clamped = desired.clamp(cfg.min, cfg.max.max(cfg.min));
    if clamped != desired {
        reason = format!("{reason}; bounded to [{}, {}]", cfg.min, cfg.max);
    }
    // While panicking, what was decided (warm floor and delay included) is the new floor.
    if let Some((since, high)) = st.panic {
        st.panic = Some((since, high.max(clamped)));
    }
    if st.thrash.observe(now, clamped, &cfg.thrash) {
        reason = format!(
            "{reason}; anti-thrash engaged: more than {} flips in {} s",
            cfg.thrash.max_flips,
            cfg.thrash.window_ms / 1000
        );
    }
    Decision {
        desired: clamped,
        panicking: st.panic.is_some(),
        warm_floor: floor,
        metrics,
        reason,
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ThrashConfig {
    pub enabled: bool,
    /// More than this many reversals within `window_ms` engage the damping.
    pub max_flips: u32,
    pub window_ms: u64,
    /// How long the warm floor holds the first time; doubles per level.
    pub cooldown_ms: u64,
}

impl Default for ThrashConfig {
    fn default() -> ThrashConfig {
        ThrashConfig {
            enabled: true,
            max_flips: 4,
            window_ms: 120_000,
            cooldown_ms: 120_000,
        }
    }
}

/// Anti-thrash state: reversals of the decided count's direction (a flip: up after down, or
/// down after up), and the warm floor while engaged. Counts flips even when disabled, so a
/// naive scaler's thrash can be seen.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Thrash {
    last: Option<u32>,
    /// +1 up, -1 down, 0 none yet.
    dir: i8,
    /// Times of flips within the window.
    flips: VecDeque<u64>,
    /// (time, count) within the window: the peak becomes the warm floor.
    counts: VecDeque<(u64, u32)>,
    pub flips_total: u64,
    /// Engaged until this time, holding `warm` instances.
    pub engaged_until: Option<u64>,
    pub warm: u32,
    /// 1 after the first engagement; each engagement within a window of the previous one's end
    /// doubles the cooldown; a quiet window resets it.
    pub level: u32,
    released_ms: Option<u64>,
}

impl Thrash {
    /// The warm floor in force at `now`, if engaged.
    pub fn floor(&self, now: u64) -> Option<u32> {
        self.engaged_until.filter(|u| now < *u).map(|_| self.warm)
    }

    pub fn flips_in_window(&self) -> usize {
        self.flips.len()
    }

    /// Records the count decided at `now`; returns true when this engages the damping.
    pub fn observe(&mut self, now: u64, count: u32, cfg: &ThrashConfig) -> bool {
        if let Some(until) = self.engaged_until
            && now >= until
        {
            self.engaged_until = None;
            self.released_ms = Some(now);
        }
        if let Some(last) = self.last {
            let dir = match count.cmp(&last) {
                std::cmp::Ordering::Greater => 1,
                std::cmp::Ordering::Less => -1,
                std::cmp::Ordering::Equal => 0,
            };
            if dir != 0 {
                if self.dir != 0 && dir != self.dir {
                    self.flips.push_back(now);
                    self.flips_total += 1;
                }
                self.dir = dir;
            }
        }
        self.last = Some(count);
        if self.counts.back().is_none_or(|c| c.1 != count) {
            self.counts.push_back((now, count));
        }
        let from = now.saturating_sub(cfg.window_ms);
        while self.flips.front().is_some_and(|t| *t < from) {
            self.flips.pop_front();
        }
        // Keep the newest count older than the window: it held into the window.
        while self.counts.len() > 1 && self.counts[1].0 <= from {
            self.counts.pop_front();
        }
        while self.counts.len() > 4096 {
            self.counts.pop_front();
        }
        if !cfg.enabled {
            self.engaged_until = None;
            return false;
        }
        if self.engaged_until.is_none() && self.flips.len() as u64 > u64::from(cfg.max_flips) {
            let recently = self
                .released_ms
                .is_some_and(|r| now.saturating_sub(r) < cfg.window_ms);
            self.level = if recently { (self.level + 1).min(6) } else { 1 };
            let hold = cfg.cooldown_ms.saturating_mul(1 << (self.level - 1));
            self.engaged_until = Some(now.saturating_add(hold));
            self.warm = self.counts.iter().map(|c| c.1).max().unwrap_or(count);
            self.flips.clear();
            return true;
        }
        if self.engaged_until.is_none()
            && self
                .released_ms
                .is_some_and(|r| now.saturating_sub(r) >= cfg.window_ms)
        {
            // Settled for a whole window after the last hold: relax fully.
            self.level = 0;
            self.released_ms = None;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn steady(from: u64, to: u64, c: f64) -> Vec<Sample> {
        (from..to)
            .step_by(1000)
            .map(|t| Sample { at_ms: t, value: c })
            .collect()
    }

    fn cfg() -> Config {
        Config {
            max: 100,
            scale_to_zero_grace_ms: 30_000,
            ..Config::default()
        }
    }

    fn two<'a>(a: &'a [Sample], b: &'a [Sample]) -> Vec<Series<'a>> {
        vec![
            Series {
                label: "concurrency",
                target: 10.0,
                samples: a,
                holds_when_idle: false,
            },
            Series {
                label: "cpu",
                target: 70.0,
                samples: b,
                holds_when_idle: false,
            },
        ]
    }

    fn one<'a>(samples: &'a [Sample]) -> [Series<'a>; 1] {
        [Series {
            label: "concurrency",
            target: 10.0,
            samples,
            holds_when_idle: false,
        }]
    }

    #[test]
    fn step_up_panics_then_settles_and_scales_to_zero_after_grace() {
        let c = cfg();
        let mut st = ScalerState::default();
        // A step from 0 to 100 concurrent with 1 instance ready: panic within seconds.
        let mut h = steady(1_000, 60_000, 0.0);
        h.extend(steady(60_000, 67_000, 100.0));
        let d = decide(&one(&h), &h, 1, 66_000, &c, &mut st);
        assert!(d.panicking, "{d:?}");
        assert_eq!(d.desired, 10, "100 concurrent / target 10, panic window");
        // Load gone: no scale-down while panicking.
        h.extend(steady(67_000, 80_000, 0.0));
        let d = decide(&one(&h), &h, 10, 80_000, &c, &mut st);
        assert!(d.panicking);
        assert_eq!(d.desired, 10);
        // A stable window after the last panic signal: panic ends; the stable average decides.
        h.extend(steady(80_000, 130_000, 0.0));
        let d = decide(&one(&h), &h, 10, 127_000, &c, &mut st);
        assert!(!d.panicking, "{d:?}");
        assert!(d.desired <= 10);
        // Long after: zero once the grace has passed since the last load.
        let d = decide(&one(&h), &h, 1, 200_000, &c, &mut st);
        assert_eq!(d.desired, 0, "{d:?}");
    }

    #[test]
    fn a_busy_revision_is_never_idle_between_reports_even_with_a_short_grace() {
        // Requests every second until 10 s; each second's report arrives after the second.
        let h = steady(0, 10_000, 1.0);
        for grace in [0, 1_000] {
            let mut c = cfg();
            c.scale_to_zero_grace_ms = grace;
            let mut st = ScalerState::default();
            // Between 9 s (the last report's bucket) and 11 s the next report may still come.
            for now in (9_000..11_000).step_by(100) {
                let d = decide(&one(&h), &h, 1, now, &c, &mut st);
                assert_eq!(d.desired, 1, "grace {grace} at {now}: {d:?}");
            }
            // No report for two seconds: quiet since 11 s; zero once the grace is over.
            let d = decide(&one(&h), &h, 1, 11_000 + grace, &c, &mut st);
            assert_eq!(d.desired, 0, "grace {grace}: {d:?}");
        }
    }

    #[test]
    fn keeps_one_inside_the_grace() {
        let c = cfg();
        let mut st = ScalerState::default();
        let mut h = steady(0, 5_000, 1.0);
        h.extend(steady(5_000, 70_000, 0.0));
        let d = decide(&one(&h), &h, 1, 30_000, &c, &mut st);
        assert_eq!(d.desired, 1);
        let d = decide(&one(&h), &h, 1, 66_000, &c, &mut st);
        assert_eq!(d.desired, 0, "{d:?}");
    }

    #[test]
    fn a_short_window_reads_the_last_reported_second() {
        let h = vec![
            Sample {
                at_ms: 9_000,
                value: 30.0,
            },
            Sample {
                at_ms: 10_000,
                value: 50.0,
            },
        ];
        assert_eq!(average(&h, 10_300, 1_000), 50.0, "this second has reported");
        assert_eq!(average(&h, 11_100, 1_000), 50.0, "not yet: the one before");
        assert_eq!(average(&h, 10_300, 2_000), 40.0);
        assert_eq!(
            average(&h, 13_500, 2_000),
            0.0,
            "seconds without reports are zero"
        );
    }

    #[test]
    fn from_zero_the_newest_bucket_counts_at_once() {
        let c = cfg();
        let h = vec![Sample {
            at_ms: 10_000,
            value: 35.0,
        }];
        let d = decide(&one(&h), &h, 0, 10_100, &c, &mut ScalerState::default());
        assert_eq!(d.desired, 4, "35 waiting / target 10: {d:?}");
    }

    #[test]
    fn from_zero_requests_start_one_even_when_only_cpu_counts() {
        let c = cfg();
        let act = vec![Sample {
            at_ms: 10_000,
            value: 1.0,
        }];
        let cpu = Series {
            label: "cpu",
            target: 50.0,
            samples: &[],
            holds_when_idle: false,
        };
        let d = decide(&[cpu], &act, 0, 10_300, &c, &mut ScalerState::default());
        assert_eq!(d.desired, 1, "{d:?}");
    }

    #[test]
    fn the_largest_metric_wins_and_resources_alone_do_not_keep_instances() {
        let c = cfg();
        let conc = steady(1_000, 61_000, 10.0); // 1 instance
        let cpu = steady(1_000, 61_000, 270.0); // 270 % over instances at 70 % each: 4
        let series = [
            Series {
                label: "concurrency",
                target: 10.0,
                samples: &conc,
                holds_when_idle: false,
            },
            Series {
                label: "cpu",
                target: 70.0,
                samples: &cpu,
                holds_when_idle: false,
            },
        ];
        let d = decide(&series, &conc, 4, 60_000, &c, &mut ScalerState::default());
        assert_eq!(d.desired, 4, "{d:?}");
        assert!(d.reason.contains("cpu"), "{}", d.reason);
        // No requests for the grace: zero even though the CPU series still shows use.
        let quiet: Vec<Sample> = vec![];
        let d = decide(&series, &quiet, 4, 60_000, &c, &mut ScalerState::default());
        assert_eq!(d.desired, 0, "{d:?}");
        // A custom metric (a queue worker's backlog) keeps what it asks for without requests.
        let backlog = steady(1_000, 61_000, 25.0);
        let with_custom = [
            series[0],
            Series {
                label: "custom:jobs",
                target: 10.0,
                samples: &backlog,
                holds_when_idle: true,
            },
        ];
        let d = decide(
            &with_custom,
            &quiet,
            4,
            60_000,
            &c,
            &mut ScalerState::default(),
        );
        assert_eq!(d.desired, 3, "{d:?}");
    }

    #[test]
    fn anti_thrash_engages_on_flips_and_relaxes_when_settled() {
        let tc = ThrashConfig {
            enabled: true,
            max_flips: 3,
            window_ms: 60_000,
            cooldown_ms: 20_000,
        };
        let mut t = Thrash::default();
        let mut engaged = Vec::new();
        // 0 ↔ 4 every 5 s for a minute: engages, and again (longer) when the flips go on.
        let step = |t: &mut Thrash, engaged: &mut Vec<_>, now: u64, want: u32| {
            let out = t.floor(now).map_or(want, |f| want.max(f));
            if t.observe(now, out, &tc) {
                engaged.push((now, t.level, t.engaged_until));
            }
            out
        };
        for i in 0..12u64 {
            step(
                &mut t,
                &mut engaged,
                i * 5_000,
                if i % 2 == 0 { 4 } else { 0 },
            );
        }
        assert_eq!(
            engaged[0],
            (25_000, 1, Some(45_000)),
            "the 4th flip (more than 3)"
        );
        assert_eq!(
            engaged[1],
            (55_000, 2, Some(95_000)),
            "again soon after: twice as long"
        );
        assert_eq!(t.warm, 4);
        // Held warm while engaged: the oscillating input no longer moves the count.
        for now in (60_000..95_000).step_by(5_000) {
            assert_eq!(
                step(
                    &mut t,
                    &mut engaged,
                    now,
                    if (now / 5_000) % 2 == 0 { 4 } else { 0 }
                ),
                4
            );
        }
        // Load settles: released at the end of the hold, then relaxed after a quiet window.
        for now in (95_000..300_000).step_by(5_000) {
            step(&mut t, &mut engaged, now, 1);
        }
        assert_eq!(engaged.len(), 2);
        assert_eq!(t.floor(300_000), None);
        assert_eq!(t.level, 0, "{t:?}");
    }

    #[test]
    fn anti_thrash_counts_but_never_engages_when_disabled() {
        let tc = ThrashConfig {
            enabled: false,
            ..ThrashConfig::default()
        };
        let mut t = Thrash::default();
        for i in 0..20u64 {
            assert!(!t.observe(i * 1000, (i % 2) as u32, &tc));
        }
        assert_eq!(t.flips_total, 18);
        assert_eq!(t.floor(20_000), None);
    }

    proptest! {
        #[test]
        fn bounded_and_monotone(
            loads in proptest::collection::vec(0.0f64..500.0, 1..90),
            cpu in proptest::collection::vec(0.0f64..400.0, 1..90),
            extra in 0.0f64..200.0,
            min in 0u32..4, span in 1u32..50, ready in 0u32..60,
        ) {
            let c = Config { min, max: min + span, ..Config::default() };
            let now = loads.len() as u64 * 1000;
            let to = |v: &[f64], add: f64| -> Vec<Sample> {
                v.iter().enumerate().map(|(i, l)| Sample { at_ms: (i as u64 + 1) * 1000, value: l + add }).collect()
            };
            let (h, more) = (to(&loads, 0.0), to(&loads, extra));
            let (cpu_h, cpu_more) = (to(&cpu, 0.0), to(&cpu, extra));
            let a = decide(&two(&h, &cpu_h), &h, ready, now, &c, &mut ScalerState::default());
            let b = decide(&two(&more, &cpu_h), &h, ready, now, &c, &mut ScalerState::default());
            let b2 = decide(&two(&h, &cpu_more), &h, ready, now, &c, &mut ScalerState::default());
            prop_assert!(a.desired >= min && a.desired <= min + span);
            prop_assert!(b.desired >= a.desired, "more load never asks for fewer: {a:?} {b:?}");
            prop_assert!(b2.desired >= a.desired, "more CPU never asks for fewer: {a:?} {b2:?}");
        }

        #[test]
        fn never_down_while_panicking_and_always_in_bounds(
            loads in proptest::collection::vec(0.0f64..500.0, 10..150),
            min in 0u32..3, span in 1u32..40, thrash in any::<bool>(),
        ) {
            let c = Config {
                min, max: min + span,
                stable_window_ms: 20_000, scale_to_zero_grace_ms: 5_000,
                thrash: ThrashConfig { enabled: thrash, max_flips: 2, window_ms: 30_000, cooldown_ms: 10_000 },
                ..Config::default()
            };
            let mut st = ScalerState::default();
            let mut h = Vec::new();
            let mut ready = 0u32;
            let mut last: Option<(bool, u32)> = None;
            for (i, l) in loads.iter().enumerate() {
                let now = (i as u64 + 1) * 1000;
                h.push(Sample { at_ms: now, value: *l });
                let d = decide(&one(&h), &h, ready, now, &c, &mut st);
                prop_assert!(d.desired >= min && d.desired <= min + span, "{d:?}");
                if let Some((true, prev)) = last && d.panicking {
                    prop_assert!(d.desired >= prev, "went down while panicking");
                }
                if let Some(f) = d.warm_floor {
                    prop_assert!(d.desired >= f.min(min + span), "below the warm floor");
                }
                last = Some((d.panicking, d.desired));
                ready = d.desired;
            }
        }

        #[test]
        fn anti_thrash_only_raises(
            wants in proptest::collection::vec(0u32..8, 20..200),
        ) {
            let on = ThrashConfig { enabled: true, max_flips: 3, window_ms: 30_000, cooldown_ms: 20_000 };
            let mut a = Thrash::default();
            for (i, w) in wants.iter().enumerate() {
                let now = i as u64 * 1000;
                let out = a.floor(now).map_or(*w, |f| f.max(*w));
                prop_assert!(out >= *w);
                if let Some(f) = a.floor(now) {
                    prop_assert!(f <= *wants.iter().max().unwrap());
                }
                a.observe(now, out, &on);
            }
        }

        #[test]
        fn anti_thrash_cuts_the_flips_of_an_oscillation(
            lo in 0u32..3, hi in 4u32..10, half in 1u64..10, n in 100u64..400,
        ) {
            let on = ThrashConfig { enabled: true, max_flips: 3, window_ms: 60_000, cooldown_ms: 30_000 };
            let off = ThrashConfig { enabled: false, ..on.clone() };
            let (mut a, mut b) = (Thrash::default(), Thrash::default());
            for i in 0..n {
                let now = i * 1000;
                let w = if (i / half) % 2 == 0 { hi } else { lo };
                let out = a.floor(now).map_or(w, |f| f.max(w));
                a.observe(now, out, &on);
                b.observe(now, w, &off);
            }
            prop_assert!(b.flips_total > 3);
            prop_assert!(a.flips_total < b.flips_total, "{} vs {}", a.flips_total, b.flips_total);
        }
    }
}
