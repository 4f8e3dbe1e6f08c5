//! Text for terminals. Step names, errors, panic messages and a guest's
//! stdout and stderr come from the workflow module, which may be hostile:
//! printed raw, an escape sequence in them could retitle the window,
//! recolour it, or worse. Control characters are written visibly instead
//! (`\u{1b}`), except line breaks and tabs where the text has them.

use std::borrow::Cow;

/// Control characters, line and paragraph separators, and the bidi
/// overrides and isolates that can make text read other than it is.
fn is_control(c: char) -> bool {
    (c.is_control() && c != '\n' && c != '\t')
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` with its control characters escaped.
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_control) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_control(c) {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Bytes a guest wrote, as text for a terminal (invalid UTF-8 replaced).
pub fn escape_bytes(bytes: &[u8]) -> Cow<'_, str> {
    match String::from_utf8_lossy(bytes) {
        Cow::Borrowed(s) => escape(s),
        Cow::Owned(s) => Cow::Owned(escape(&s).into_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_escaped_and_text_is_kept() {
        assert_eq!(escape("plain\ttext\n"), "plain\ttext\n");
        assert_eq!(escape("\u{1b}]0;owned\u{7}red"), "\\u{1b}]0;owned\\u{7}red");
        assert_eq!(escape("c1 \u{9b}31m"), "c1 \\u{9b}31m");
        assert_eq!(escape("del\u{7f}"), "del\\u{7f}");
        assert_eq!(escape_bytes(b"\xff\x1b[2J"), "\u{fffd}\\u{1b}[2J");
    }
}
