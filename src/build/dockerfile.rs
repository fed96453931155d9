//! The one change previewd makes to a Dockerfile: its labels, as one `LABEL` instruction right
//! after the final stage's `FROM`. There, the step is the same for every build of a preview (the
//! labels name the instance and the preview, nothing that changes per push), so the engine's
//! layer cache serves it on every rebuild: on an engine where each build step costs a second
//! (a commit on fuse-overlayfs), a `LABEL` appended at the end would cost that on every push.
//!
//! Reading is line-based, as Docker's parser is: a parser directive `# escape=` (before any
//! instruction) sets the escape character, a line ending with it continues the instruction,
//! comment lines are skipped. A Dockerfile previewd misreads cannot slip through: the built
//! image must carry the labels (see `crate::build`).

/// `text` with `label_line` inserted after the final `FROM` instruction (at the end when there
/// is none: the engine refuses such a Dockerfile anyway).
pub fn with_labels(text: &str, label_line: &str) -> String {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let escape = escape_char(&lines);
    let mut after_last_from = None;
    let mut index = 0;
    while index < lines.len() {
        let line = lines[index].trim();
        if line.is_empty() || line.starts_with('#') {
            index += 1;
            continue;
        }
        let is_from = line.split_whitespace().next().is_some_and(|word| word.eq_ignore_ascii_case("FROM"));
        // The instruction's last physical line: continuations end with the escape character.
        let mut end = index;
        while end + 1 < lines.len() && continues(lines[end], escape) {
            end += 1;
        }
        if is_from {
            after_last_from = Some(end + 1);
        }
        index = end + 1;
    }
    let at = after_last_from.unwrap_or(lines.len());
    let mut out = String::with_capacity(text.len() + label_line.len() + 2);
    for line in &lines[..at] {
        out.push_str(line);
    }
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(label_line.trim_end());
    out.push('\n');
    for line in &lines[at..] {
        out.push_str(line);
    }
    out
}

/// The escape character a `# escape=` parser directive sets (`\` without one). Directives come
/// first, before any comment, blank line or instruction.
fn escape_char(lines: &[&str]) -> char {
    for line in lines {
        let Some(directive) = line.trim().strip_prefix('#') else { return '\\' };
        let Some((key, value)) = directive.split_once('=') else { return '\\' };
        if key.trim().eq_ignore_ascii_case("escape") {
            return match value.trim() {
                "`" => '`',
                _ => '\\',
            };
        }
    }
    '\\'
}

/// Whether a physical line continues onto the next one. A comment line or a blank line inside an
/// instruction does not end it (Docker skips them), so they continue too.
fn continues(line: &str, escape: char) -> bool {
    let trimmed = line.trim();
    trimmed.is_empty() || trimmed.ends_with(escape) || trimmed.starts_with('#')
}

#[cfg(test)]
mod tests {
    use super::*;

    const LABEL: &str = "LABEL previewd.built=\"true\"\n";

    #[test]
    fn the_labels_follow_the_final_stages_from() {
        let text = "FROM base AS build\nRUN make\nFROM runtime\nCOPY --from=build /out /app\nCMD [\"/app\"]\n";
        assert_eq!(
            with_labels(text, LABEL),
            "FROM base AS build\nRUN make\nFROM runtime\nLABEL previewd.built=\"true\"\nCOPY --from=build /out /app\nCMD [\"/app\"]\n"
        );
    }

    #[test]
    fn a_from_continued_on_several_lines_keeps_its_lines_together() {
        let text = "ARG V=1\nfrom \\\n  base:${V} \\\n  AS app\nRUN true\n";
        assert_eq!(
            with_labels(text, LABEL),
            "ARG V=1\nfrom \\\n  base:${V} \\\n  AS app\nLABEL previewd.built=\"true\"\nRUN true\n"
        );
    }

    #[test]
    fn the_escape_directive_and_comments_are_read_as_docker_does() {
        let text = "# escape=`\nFROM base `\n  AS app\n# a comment\nRUN echo \\\n";
        assert_eq!(
            with_labels(text, LABEL),
            "# escape=`\nFROM base `\n  AS app\nLABEL previewd.built=\"true\"\n# a comment\nRUN echo \\\n"
        );
        let text = "RUN a \\\n# FROM inside a comment\n  b\nFROM x";
        assert_eq!(
            with_labels(text, LABEL),
            "RUN a \\\n# FROM inside a comment\n  b\nFROM x\nLABEL previewd.built=\"true\"\n"
        );
    }

    #[test]
    fn blank_lines_inside_a_from_and_a_byte_order_mark_are_skipped_as_docker_does() {
        let text = "\u{feff}FROM \\\n\n  base AS app\nRUN x\n";
        assert_eq!(with_labels(text, LABEL), "FROM \\\n\n  base AS app\nLABEL previewd.built=\"true\"\nRUN x\n");
    }

    #[test]
    fn without_a_from_the_labels_go_last() {
        assert_eq!(with_labels("RUN true", LABEL), "RUN true\nLABEL previewd.built=\"true\"\n");
    }
}
