//! The little of the Prometheus text exposition format the custom-metric scrape needs: the
//! value of a named metric, summed over its label sets. Comments, other metrics and malformed
//! lines are skipped; nothing here panics on input.

/// The sum of the samples of `name` (any labels) in `text`, or `None` when it has none.
pub fn value(text: &str, name: &str) -> Option<f64> {
    let mut sum = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // The name must end here: at labels or whitespace.
        let rest = match rest.chars().next() {
            Some('{') => match label_end(rest) {
                Some(end) => &rest[end..],
                None => continue,
            },
            Some(c) if c.is_whitespace() => rest,
            _ => continue,
        };
        let Some(v) = rest.split_whitespace().next() else {
            continue;
        };
        let v = match v {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => match v.parse::<f64>() {
                Ok(v) => v,
                Err(_) => continue,
            },
        };
        if v.is_finite() {
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}

/// The byte just past the `}` closing the label set at the start of `s`, skipping quoted
/// values (which may hold `}` and escaped quotes).
fn label_end(s: &str) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in s.char_indices().skip(1) {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return Some(i + 1),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reads_gauges_and_sums_label_sets() {
        let text = "# HELP jobs Jobs waiting\n# TYPE jobs gauge\njobs 3\njobs_total 99\n\
                    queue{q=\"a\"} 2.5\nqueue{q=\"b}\\\"x\"} 1.5 1700000000000\nqueue{bad 7\n\
                    other 1\nnan_metric NaN\n";
        assert_eq!(value(text, "jobs"), Some(3.0));
        assert_eq!(value(text, "jobs_total"), Some(99.0));
        assert_eq!(value(text, "queue"), Some(4.0));
        assert_eq!(value(text, "missing"), None);
        assert_eq!(value(text, "nan_metric"), None);
        assert_eq!(
            value("testapp_custom_gauge 7\n", "testapp_custom_gauge"),
            Some(7.0)
        );
    }

    proptest! {
        #[test]
        fn never_panics(text in ".{0,300}", name in "[a-z_]{1,8}") {
            let _ = value(&text, &name);
        }
    }
}
