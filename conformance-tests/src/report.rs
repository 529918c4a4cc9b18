//! The result of a run: per-case outcomes, rendered as JSON, Markdown or a
//! plain text table.

use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;

/// How a case ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The backend did what the contract says.
    Passed,
    /// The backend disagreed with the contract, errored, panicked or timed out.
    Failed,
    /// The case needs a capability or fault hook the backend does not offer.
    Skipped,
}

impl Outcome {
    /// `passed`, `failed` or `skipped`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Passed => "passed",
            Outcome::Failed => "failed",
            Outcome::Skipped => "skipped",
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of one case.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CaseReport {
    /// The case's name (`kv::cas_conflict`).
    pub name: String,
    /// How it ended.
    pub outcome: Outcome,
    /// Why it failed or was skipped; empty when it passed.
    pub reason: String,
    /// How long it took, including opening the backend.
    pub millis: u64,
    /// The contract sentence it checks.
    pub contract: String,
}

/// The outcome of a run against one backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Report {
    /// The backend kind.
    pub backend: String,
    /// The suite's version ([`crate::SUITE_VERSION`]).
    pub suite_version: String,
    /// One entry per case run, in suite order.
    pub cases: Vec<CaseReport>,
}

impl Report {
    fn count(&self, outcome: Outcome) -> usize {
        self.cases.iter().filter(|c| c.outcome == outcome).count()
    }

    /// Cases that passed.
    pub fn passed(&self) -> usize {
        self.count(Outcome::Passed)
    }

    /// Cases that failed.
    pub fn failed(&self) -> usize {
        self.count(Outcome::Failed)
    }

    /// Cases that were skipped.
    pub fn skipped(&self) -> usize {
        self.count(Outcome::Skipped)
    }

    fn totals(&self) -> String {
        format!(
            "{} cases: {} passed, {} failed, {} skipped",
            self.cases.len(),
            self.passed(),
            self.failed(),
            self.skipped()
        )
    }

    /// The report as pretty-printed JSON:
    /// `{"backend", "suite_version", "cases": [{"name", "outcome", "reason", "millis", "contract"}]}`.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| {
            format!(
                "{{\"error\": {:?}}}",
                format!("cannot render the report: {e}")
            )
        })
    }

    /// The report as a Markdown document with one table row per case.
    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# dprim conformance: `{}`\n", self.backend);
        let _ = writeln!(
            out,
            "Suite version {}. {}.\n",
            self.suite_version,
            self.totals()
        );
        out.push_str("| case | outcome | ms | reason |\n|---|---|---:|---|\n");
        for c in &self.cases {
            let outcome = match c.outcome {
                Outcome::Passed => "passed",
                Outcome::Failed => "**failed**",
                Outcome::Skipped => "skipped",
            };
            let _ = writeln!(
                out,
                "| `{}` | {} | {} | {} |",
                c.name,
                outcome,
                c.millis,
                markdown_cell(&c.reason)
            );
        }
        out
    }

    /// An aligned plain text table (case | outcome | ms | reason) and a totals line.
    pub fn table(&self) -> String {
        let header = ["case", "outcome", "ms", "reason"];
        let rows: Vec<[String; 4]> = self
            .cases
            .iter()
            .map(|c| {
                [
                    c.name.clone(),
                    c.outcome.to_string(),
                    c.millis.to_string(),
                    one_line(&c.reason),
                ]
            })
            .collect();
        let mut widths = header.map(str::len);
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let mut line = |cells: [&str; 4]| {
            let text = format!(
                "{:<w0$}  {:<w1$}  {:>w2$}  {}",
                cells[0],
                cells[1],
                cells[2],
                cells[3],
                w0 = widths[0],
                w1 = widths[1],
                w2 = widths[2]
            );
            out.push_str(text.trim_end());
            out.push('\n');
        };
        line(header);
        for row in &rows {
            line([&row[0], &row[1], &row[2], &row[3]]);
        }
        out.push_str(&self.totals());
        out.push('\n');
        out
    }

    /// Writes `report.json` and `report.md` into `dir`, creating it if needed.
    pub fn write_to(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("report.json"), self.to_json())?;
        std::fs::write(dir.join("report.md"), self.to_markdown())?;
        Ok(())
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn markdown_cell(s: &str) -> String {
    one_line(s).replace('|', "\\|")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Report {
        Report {
            backend: "memory".into(),
            suite_version: "0.1.0".into(),
            cases: vec![
                CaseReport {
                    name: "kv::get_missing_is_none".into(),
                    outcome: Outcome::Passed,
                    reason: String::new(),
                    millis: 3,
                    contract: "Returns `Ok(None)` for a missing key".into(),
                },
                CaseReport {
                    name: "kv::txn_all_or_nothing".into(),
                    outcome: Outcome::Skipped,
                    reason: "requires capability kv.transactions".into(),
                    millis: 1,
                    contract: "x".into(),
                },
                CaseReport {
                    name: "lock::fifo".into(),
                    outcome: Outcome::Failed,
                    reason: "order a | b\nwrong".into(),
                    millis: 1200,
                    contract: "y".into(),
                },
            ],
        }
    }

    #[test]
    fn json_has_the_documented_shape() {
        let v: serde_json::Value = serde_json::from_str(&sample().to_json()).expect("json");
        assert_eq!(v["backend"], "memory");
        assert_eq!(v["suite_version"], "0.1.0");
        assert_eq!(v["cases"][0]["outcome"], "passed");
        assert_eq!(v["cases"][1]["outcome"], "skipped");
        assert_eq!(v["cases"][2]["outcome"], "failed");
        assert_eq!(v["cases"][2]["millis"], 1200);
        assert_eq!(
            v["cases"][1]["reason"],
            "requires capability kv.transactions"
        );
    }

    #[test]
    fn table_and_markdown() {
        let r = sample();
        assert_eq!((r.passed(), r.failed(), r.skipped()), (1, 1, 1));
        let t = r.table();
        assert!(t.contains("3 cases: 1 passed, 1 failed, 1 skipped"), "{t}");
        assert!(t.lines().all(|l| !l.ends_with(' ')));
        let md = r.to_markdown();
        assert!(md.contains("order a \\| b wrong"), "{md}");
        let dir = std::env::temp_dir().join(format!("dprim-conf-report-{}", std::process::id()));
        r.write_to(&dir).expect("write");
        assert!(dir.join("report.json").exists() && dir.join("report.md").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
