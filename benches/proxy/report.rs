//! Figures per round and contender, their medians, the router's ratios to
//! direct and to nginx (medians of the per-round ratios, so drift between
//! rounds cancels), targets, one printed table and the same as JSON.

use serde_json::{json, Value};

pub const CONTENDERS: [&str; 3] = ["direct", "router", "nginx"];
pub const DIRECT: usize = 0;
pub const ROUTER: usize = 1;
pub const NGINX: usize = 2;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

/// What the router must achieve on one figure.
#[derive(Clone, Copy)]
pub enum Target {
    /// router ÷ nginx ≥ x
    NginxRatioAtLeast(f64),
    /// router ÷ nginx ≤ x
    NginxRatioAtMost(f64),
    /// router ÷ direct ≥ x
    DirectRatioAtLeast(f64),
    /// the router's own figure ≤ x
    RouterAtMost(f64),
    /// the router's own figure < x
    RouterBelow(f64),
    /// the router's own figure ≥ x
    RouterAtLeast(f64),
}

impl Target {
    fn describe(self, unit: &str) -> String {
        match self {
            Target::NginxRatioAtLeast(x) => format!("≥ {x:.1}× nginx"),
            Target::NginxRatioAtMost(x) => format!("≤ {x:.1}× nginx"),
            Target::DirectRatioAtLeast(x) => format!("≥ {x:.1}× direct"),
            Target::RouterAtMost(x) => format!("≤ {} {unit}", fmt_num(x)),
            Target::RouterBelow(x) => format!("< {} {unit}", fmt_num(x)),
            Target::RouterAtLeast(x) => format!("≥ {}{unit}", fmt_num(x)),
        }
    }

    fn met(self, row: &Summary) -> Option<bool> {
        let router = row.values[ROUTER];
        Some(match self {
            Target::NginxRatioAtLeast(x) => row.to_nginx? >= x,
            Target::NginxRatioAtMost(x) => row.to_nginx? <= x,
            Target::DirectRatioAtLeast(x) => row.to_direct? >= x,
            Target::RouterAtMost(x) => router? <= x,
            Target::RouterBelow(x) => router? < x,
            Target::RouterAtLeast(x) => router? >= x,
        })
    }
}

pub struct Metric {
    pub key: &'static str,
    pub label: String,
    pub unit: &'static str,
    pub better: Better,
    /// Whether router ÷ direct and router ÷ nginx mean anything here.
    pub ratios: bool,
    pub rounds: Vec<[Option<f64>; 3]>,
    pub target: Option<Target>,
}

pub struct Summary {
    pub values: [Option<f64>; 3],
    pub to_direct: Option<f64>,
    pub to_nginx: Option<f64>,
    pub met: Option<bool>,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

impl Metric {
    pub fn summary(&self) -> Summary {
        let column = |c: usize| median(self.rounds.iter().filter_map(|r| r[c]).collect());
        let ratio = |other: usize| {
            if !self.ratios {
                return None;
            }
            median(
                self.rounds
                    .iter()
                    .filter_map(|r| Some(r[ROUTER]? / r[other]?))
                    .collect(),
            )
        };
        let mut summary = Summary {
            values: [column(DIRECT), column(ROUTER), column(NGINX)],
            to_direct: ratio(DIRECT),
            to_nginx: ratio(NGINX),
            met: None,
        };
        summary.met = self.target.and_then(|t| t.met(&summary));
        summary
    }
}

#[derive(Default)]
pub struct Report {
    pub metrics: Vec<Metric>,
}

impl Report {
    /// Declares a figure; the order of declaration is the order of the table.
    pub fn metric(
        &mut self,
        key: &'static str,
        label: impl Into<String>,
        unit: &'static str,
        better: Better,
        ratios: bool,
        target: Option<Target>,
    ) {
        if self.metrics.iter().any(|m| m.key == key) {
            return;
        }
        self.metrics.push(Metric {
            key,
            label: label.into(),
            unit,
            better,
            ratios,
            rounds: Vec::new(),
            target,
        });
    }

    pub fn record(&mut self, key: &str, round: usize, contender: usize, value: f64) {
        let metric = self
            .metrics
            .iter_mut()
            .find(|m| m.key == key)
            .unwrap_or_else(|| panic!("metric {key} not declared"));
        while metric.rounds.len() <= round {
            metric.rounds.push([None; 3]);
        }
        metric.rounds[round][contender] = Some(value);
    }

    pub fn get(&self, key: &str) -> Option<Summary> {
        self.metrics
            .iter()
            .find(|m| m.key == key && !m.rounds.is_empty())
            .map(Metric::summary)
    }

    /// The table, as Markdown (readable in a terminal, pasteable in a README).
    pub fn table(&self) -> String {
        let mut rows = vec![[
            "figure".to_string(),
            "direct".into(),
            "router".into(),
            "nginx".into(),
            "router÷direct".into(),
            "router÷nginx".into(),
            "target".into(),
            "".into(),
        ]];
        for metric in self.metrics.iter().filter(|m| !m.rounds.is_empty()) {
            let s = metric.summary();
            let value = |c: usize| s.values[c].map_or("—".to_string(), fmt_num);
            let ratio = |r: Option<f64>| r.map_or("—".to_string(), |r| format!("{r:.2}×"));
            rows.push([
                format!("{} ({})", metric.label, metric.unit),
                value(DIRECT),
                value(ROUTER),
                value(NGINX),
                ratio(s.to_direct),
                ratio(s.to_nginx),
                metric.target.map_or(String::new(), |t| t.describe(metric.unit)),
                match s.met {
                    Some(true) => "met".into(),
                    Some(false) => "MISSED".into(),
                    None if metric.target.is_some() => "n/a".into(),
                    None => String::new(),
                },
            ]);
        }
        let widths: Vec<usize> = (0..8)
            .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
            .collect();
        let right = |c: usize| (1..6).contains(&c);
        let mut out = String::new();
        for (i, row) in rows.iter().enumerate() {
            let cells: Vec<String> = row
                .iter()
                .enumerate()
                .map(|(c, cell)| {
                    let pad = " ".repeat(widths[c] - cell.chars().count());
                    if right(c) {
                        format!(" {pad}{cell} ")
                    } else {
                        format!(" {cell}{pad} ")
                    }
                })
                .collect();
            out.push_str(&format!("|{}|\n", cells.join("|")));
            if i == 0 {
                let rule: Vec<String> = widths
                    .iter()
                    .enumerate()
                    .map(|(c, w)| {
                        if right(c) {
                            format!("{}:", "-".repeat(w + 1))
                        } else {
                            "-".repeat(w + 2)
                        }
                    })
                    .collect();
                out.push_str(&format!("|{}|\n", rule.join("|")));
            }
        }
        out
    }

    pub fn json(&self, context: Value) -> Value {
        let figures: Vec<Value> = self
            .metrics
            .iter()
            .filter(|m| !m.rounds.is_empty())
            .map(|m| {
                let s = m.summary();
                let rounds: Vec<Value> = m
                    .rounds
                    .iter()
                    .map(|r| json!({ "direct": r[DIRECT], "router": r[ROUTER], "nginx": r[NGINX] }))
                    .collect();
                json!({
                    "key": m.key,
                    "label": m.label,
                    "unit": m.unit,
                    "better": if m.better == Better::Higher { "higher" } else { "lower" },
                    "direct": s.values[DIRECT],
                    "router": s.values[ROUTER],
                    "nginx": s.values[NGINX],
                    "router_to_direct": s.to_direct,
                    "router_to_nginx": s.to_nginx,
                    "target": m.target.map(|t| t.describe(m.unit)),
                    "met": s.met,
                    "rounds": rounds,
                })
            })
            .collect();
        let missed: Vec<&str> = self
            .metrics
            .iter()
            .filter(|m| !m.rounds.is_empty() && m.summary().met == Some(false))
            .map(|m| m.key)
            .collect();
        json!({ "context": context, "figures": figures, "targets_missed": missed })
    }
}

pub fn fmt_num(x: f64) -> String {
    let a = x.abs();
    if a >= 10_000.0 {
        let s = format!("{:.0}", x.abs());
        let mut grouped = String::new();
        for (i, ch) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                grouped.push(' ');
            }
            grouped.push(ch);
        }
        if x < 0.0 {
            format!("-{grouped}")
        } else {
            grouped
        }
    } else if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}
