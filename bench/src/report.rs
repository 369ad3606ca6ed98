//! Results as rows of (scenario, metric, baseline, Sinew), printed as a
//! table and written as JSON.

use std::fmt::Write as _;

use serde::Serialize;

use crate::stats::Samples;

/// Whether a larger or smaller value is better, which decides how to read
/// the ratio.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    /// Rates and throughput.
    Higher,
    /// Latencies, memory.
    Lower,
}

/// One metric of one scenario, measured on a baseline and on Sinew.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// `same-node`, `cross-node vxlan`, `cni`, ...
    pub scenario: String,
    /// `TCP_RR rate`, `TCP_CRR p99`, ...
    pub metric: String,
    /// Unit of every value in the row.
    pub unit: &'static str,
    /// Which direction is better.
    pub better: Better,
    /// What the baseline is (`routed`, `veth pair`, ...); empty when none.
    pub baseline: String,
    /// The baseline's value per repetition.
    pub baseline_samples: Samples,
    /// Sinew's value per repetition.
    pub sinew_samples: Samples,
}

impl Row {
    /// Sinew's median divided by the baseline's.
    pub fn ratio(&self) -> Option<f64> {
        let b = self.baseline_samples.median()?;
        let s = self.sinew_samples.median()?;
        (b != 0.0).then(|| s / b)
    }
}

/// Everything one invocation measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Repetitions per comparison.
    pub reps: u32,
    /// Seconds per TCP_RR / TCP_CRR / iperf3 run.
    pub duration_secs: f64,
    /// The CPU model and where clients and servers ran ([`crate::cpu`]).
    pub cpu: String,
    /// The rows, in the order measured.
    pub rows: Vec<Row>,
    /// Things worth knowing about the run (a busy machine, skipped parts).
    pub notes: Vec<String>,
}

/// Formats `v` in `unit` for the table.
pub fn format_value(v: Option<f64>, unit: &str) -> String {
    let Some(v) = v else { return "-".into() };
    match unit {
        "tx/s" | "conn/s" | "entries" | "ns" => format!("{v:.0}"),
        "us" => format!("{v:.1}"),
        "Gbit/s" => format!("{v:.2}"),
        "ms" => format!("{v:.2}"),
        "MiB" => format!("{v:.1}"),
        "KiB" => format!("{v:.1}"),
        _ => format!("{v:.3}"),
    }
}

fn spread(s: &Samples) -> String {
    match (s.spread_pct(), s.values.len()) {
        (_, 0) => "-".into(),
        (_, 1) => "n=1".into(),
        (Some(p), _) => format!("{p:.1}%"),
        (None, _) => "-".into(),
    }
}

impl Report {
    /// The table: one line per row, columns aligned.
    pub fn table(&self) -> String {
        let header = [
            "scenario",
            "metric",
            "unit",
            "baseline",
            "base median",
            "sinew median",
            "sinew/base",
            "base spread",
            "sinew spread",
        ];
        let mut lines: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
        for r in &self.rows {
            let base = if r.baseline.is_empty() {
                "-".into()
            } else {
                r.baseline.clone()
            };
            lines.push(vec![
                r.scenario.clone(),
                r.metric.clone(),
                r.unit.to_owned(),
                base,
                format_value(r.baseline_samples.median(), r.unit),
                format_value(r.sinew_samples.median(), r.unit),
                r.ratio().map_or("-".into(), |x| format!("{x:.3}")),
                spread(&r.baseline_samples),
                spread(&r.sinew_samples),
            ]);
        }
        let widths: Vec<usize> = (0..header.len())
            .map(|c| lines.iter().map(|l| l[c].len()).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for (i, l) in lines.iter().enumerate() {
            let cells: Vec<String> = l
                .iter()
                .enumerate()
                .map(|(c, s)| {
                    // Text columns left-aligned, numbers right-aligned.
                    if c < 4 {
                        format!("{s:<w$}", w = widths[c])
                    } else {
                        format!("{s:>w$}", w = widths[c])
                    }
                })
                .collect();
            let _ = writeln!(out, "{}", cells.join("  ").trim_end());
            if i == 0 {
                let total = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
                let _ = writeln!(out, "{}", "-".repeat(total));
            }
        }
        out.push_str(&format!(
            "reps {}, {} s per run; spread = (max-min)/median over reps; ratio > 1 is better for rates, < 1 for latencies and memory\n",
            self.reps, self.duration_secs
        ));
        if !self.cpu.is_empty() {
            let _ = writeln!(out, "cpu: {}", self.cpu);
        }
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(base: &[f64], sinew: &[f64]) -> Row {
        Row {
            scenario: "same-node".into(),
            metric: "TCP_RR rate".into(),
            unit: "tx/s",
            better: Better::Higher,
            baseline: "routed".into(),
            baseline_samples: Samples { values: base.to_vec() },
            sinew_samples: Samples { values: sinew.to_vec() },
        }
    }

    #[test]
    fn ratio_is_sinew_over_baseline_medians() {
        assert_eq!(row(&[100.0, 200.0, 300.0], &[100.0, 50.0, 150.0]).ratio(), Some(0.5));
        assert_eq!(row(&[], &[1.0]).ratio(), None);
        assert_eq!(row(&[0.0], &[1.0]).ratio(), None);
    }

    #[test]
    fn table_has_one_line_per_row_and_the_ratio() {
        let report = Report {
            reps: 3,
            duration_secs: 1.0,
            rows: vec![row(&[100.0, 110.0, 90.0], &[50.0, 50.0, 50.0])],
            notes: vec!["machine busy".into()],
            cpu: "Example CPU (2 CPUs usable); client on CPU 1, server on CPU 0".into(),
        };
        let t = report.table();
        assert!(t.contains("0.500"), "{t}");
        assert!(t.contains("20.0%"), "{t}");
        assert!(t.contains("note: machine busy"), "{t}");
        assert!(t.contains("cpu: Example CPU"), "{t}");
        assert_eq!(t.lines().filter(|l| l.starts_with("same-node")).count(), 1);
    }
}
