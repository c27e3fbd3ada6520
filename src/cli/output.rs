//! Output for people (aligned tables) and scripts (`--json`).

use serde::Serialize;

/// Print rows as an aligned table with a header line.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    print!("{}", render_table(headers, rows));
}

/// Render an aligned table (numbers right-aligned).
pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < width.len() {
                width[i] = width[i].max(c.chars().count());
            }
        }
    }
    let numeric = |c: &str| {
        !c.is_empty()
            && c.chars()
                .all(|ch| ch.is_ascii_digit() || "/.-".contains(ch))
    };
    // Right-align a column only when every cell in it is a number.
    let right: Vec<bool> = (0..width.len())
        .map(|i| {
            i > 0 && !rows.is_empty() && rows.iter().all(|r| r.get(i).is_some_and(|c| numeric(c)))
        })
        .collect();
    let line = |cells: Vec<&str>, right: &[bool]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = width[i].saturating_sub(c.chars().count());
            let last = i + 1 == cells.len();
            if right[i] {
                s.push_str(&" ".repeat(pad));
                s.push_str(c);
            } else {
                s.push_str(c);
                if !last {
                    s.push_str(&" ".repeat(pad));
                }
            }
            if !last {
                s.push_str("  ");
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(headers.to_vec(), &right);
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect(), &right));
    }
    out
}

/// Print a value as pretty JSON.
pub fn json<T: Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("error: cannot render JSON: {e}"),
    }
}

/// The first line of an optional error, cut to `max` characters.
pub fn first_line(text: &Option<String>, max: usize) -> String {
    text.as_deref()
        .and_then(|e| e.lines().next())
        .unwrap_or("")
        .chars()
        .take(max)
        .collect()
}

/// `-` for None.
pub fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref()
        .map_or_else(|| "-".to_string(), ToString::to_string)
}

#[cfg(test)]
mod tests {
    #[test]
    fn tables_align() {
        let t = super::render_table(
            &["queue", "ready"],
            &[
                vec!["a".into(), "5".into()],
                vec!["long".into(), "123".into()],
            ],
        );
        assert_eq!(t, "queue  ready\na          5\nlong     123\n");
    }
}
