//! Output: human tables by default, `-o json` / `-o yaml` for the same data as documents, and
//! progress lines on stderr (so stdout stays parseable).

use std::fmt::Write as _;

use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("encoding JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("encoding YAML: {0}")]
    Yaml(#[from] serde_saphyr::SerializeError),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Human-readable tables.
    #[default]
    Table,
    Json,
    Yaml,
}

/// `value` as JSON or YAML, or as `table()` renders it for people.
pub fn render<T: Serialize>(
    format: Format,
    value: &T,
    table: impl FnOnce(&T) -> String,
) -> Result<String, Error> {
    Ok(match format {
        Format::Table => table(value),
        Format::Json => serde_json::to_string_pretty(value)? + "\n",
        Format::Yaml => serde_saphyr::to_string(value)?,
    })
}

/// A table with a header row; columns padded to their widest cell, two spaces apart.
#[derive(Clone, Debug, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Self {
        Self {
            headers: headers.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self) -> String {
        let columns = self
            .headers
            .len()
            .max(self.rows.iter().map(Vec::len).max().unwrap_or(0));
        let mut widths = vec![0; columns];
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            for (i, cell) in row.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    let _ = write!(line, "{cell:<width$}  ", width = widths[i]);
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// A titled section: the title, then the table (or `(none)`).
pub fn section(title: &str, table: &Table) -> String {
    let body = if table.is_empty() {
        "(none)\n".to_owned()
    } else {
        table.render()
    };
    format!("{title}\n{body}")
}

/// `-` for an absent value.
pub fn or_dash(value: Option<impl ToString>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// Progress messages on stderr (`--quiet` silences them).
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    pub quiet: bool,
}

impl Progress {
    pub fn say(self, message: &str) {
        if !self.quiet {
            eprintln!("meshctl: {message}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_aligned_to_the_widest_cell() {
        let mut t = Table::new(&["NAME", "VIP", "BACKENDS"]);
        t.row(vec![
            "demo/whoami".into(),
            "198.19.0.10:80".into(),
            "3".into(),
        ]);
        t.row(vec![
            "demo/helloworld".into(),
            "198.19.0.20:80".into(),
            "3".into(),
        ]);
        let expected = "\
NAME             VIP             BACKENDS
demo/whoami      198.19.0.10:80  3
demo/helloworld  198.19.0.20:80  3
";
        assert_eq!(t.render(), expected);
    }

    #[test]
    fn empty_sections_say_none_and_documents_carry_the_data() {
        assert_eq!(
            section("POLICIES", &Table::new(&["A"])),
            "POLICIES\n(none)\n"
        );
        let value = serde_json::json!({"node": "n1", "ready": true});
        let json = render(Format::Json, &value, |_| unreachable!()).expect("json");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&json).expect("parse"),
            value
        );
        let yaml = render(Format::Yaml, &value, |_| unreachable!()).expect("yaml");
        assert!(
            yaml.contains("node: n1") && yaml.contains("ready: true"),
            "{yaml}"
        );
        assert_eq!(
            render(Format::Table, &value, |v| v["node"].to_string()).expect("t"),
            "\"n1\""
        );
    }
}
