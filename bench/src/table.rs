//! Result tables, rendered as aligned text for the terminal or as Markdown.

use std::fmt::Write as _;

/// One benchmark's results: a titled table plus free-text notes.
#[derive(Clone, Debug, Default)]
pub struct Table {
    /// Heading, for example "cold-spawn".
    pub title: String,
    /// Column headers.
    pub headers: Vec<String>,
    /// Rows, each as many cells as `headers`.
    pub rows: Vec<Vec<String>>,
    /// Lines printed under the table (iteration counts, caveats).
    pub notes: Vec<String>,
}

impl Table {
    /// An empty table with these column headers.
    pub fn new(title: impl Into<String>, headers: &[&str]) -> Self {
        Table {
            title: title.into(),
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Appends a row; short rows are padded with empty cells.
    pub fn row<I, S>(&mut self, cells: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut row: Vec<String> = cells.into_iter().map(Into::into).collect();
        row.resize(self.headers.len().max(row.len()), String::new());
        self.rows.push(row);
    }

    /// Appends a note line.
    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    fn widths(&self) -> Vec<usize> {
        let mut w: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                if i >= w.len() {
                    w.push(0);
                }
                w[i] = w[i].max(cell.chars().count());
            }
        }
        w
    }

    /// Plain text: first column left-aligned, the others right-aligned.
    pub fn to_text(&self) -> String {
        let w = self.widths();
        let mut out = String::new();
        let _ = writeln!(out, "== {} ==", self.title);
        let line = |cells: &[String], out: &mut String| {
            let mut s = String::new();
            for (i, width) in w.iter().enumerate() {
                let cell = cells.get(i).map(String::as_str).unwrap_or("");
                if i > 0 {
                    s.push_str("  ");
                }
                if i == 0 {
                    let _ = write!(s, "{cell:<width$}");
                } else {
                    let _ = write!(s, "{cell:>width$}");
                }
            }
            let _ = writeln!(out, "{}", s.trim_end());
        };
        line(&self.headers, &mut out);
        let total = w.iter().sum::<usize>() + 2 * w.len().saturating_sub(1);
        let _ = writeln!(out, "{}", "-".repeat(total));
        for row in &self.rows {
            line(row, &mut out);
        }
        for note in &self.notes {
            let _ = writeln!(out, "  * {note}");
        }
        out
    }

    /// A Markdown section: `### title`, a pipe table, then the notes as a
    /// bullet list.
    pub fn to_markdown(&self) -> String {
        let esc = |s: &str| s.replace('|', "\\|");
        let mut out = String::new();
        let _ = writeln!(out, "### {}\n", self.title);
        let _ = writeln!(
            out,
            "| {} |",
            self.headers
                .iter()
                .map(|h| esc(h))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let align: Vec<&str> = (0..self.headers.len())
            .map(|i| if i == 0 { "---" } else { "---:" })
            .collect();
        let _ = writeln!(out, "| {} |", align.join(" | "));
        for row in &self.rows {
            let _ = writeln!(
                out,
                "| {} |",
                row.iter().map(|c| esc(c)).collect::<Vec<_>>().join(" | ")
            );
        }
        if !self.notes.is_empty() {
            out.push('\n');
            for note in &self.notes {
                let _ = writeln!(out, "- {note}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_text_and_markdown() {
        let mut t = Table::new("demo", &["case", "p50 µs"]);
        t.row(["a|b", "12.5"]);
        t.row(["long case name"]);
        t.note("2000 iterations");
        let text = t.to_text();
        assert!(text.contains("== demo =="));
        assert!(text.contains(&format!("a|b{}12.5\n", " ".repeat(15))));
        assert!(text.contains("long case name\n"));
        assert!(text.contains("  * 2000 iterations"));
        let md = t.to_markdown();
        assert!(md.contains("| case | p50 µs |\n| --- | ---: |\n| a\\|b | 12.5 |"));
        assert!(md.contains("| long case name |  |"));
        assert!(md.contains("- 2000 iterations"));
    }
}
