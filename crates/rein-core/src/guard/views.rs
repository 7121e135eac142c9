//! The views of a text the detector reads: normalised (lookalikes, leetspeak and spaced letters
//! undone), hidden markup brought out, and encoded payloads decoded.

use regex::Regex;
use std::sync::LazyLock;
use unicode_normalization::UnicodeNormalization;

/// A normalised text and whether the original disguised itself.
pub(super) struct Normalised {
    pub(super) text: String,
    pub(super) disguised: bool,
}

/// Invisible characters that split words without showing (zero-width space, joiners, word
/// joiner, invisible operators, soft hyphen, byte-order mark, the tag block).
pub(super) fn is_invisible(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}' | '\u{E0000}'..='\u{E007F}')
}

/// Cyrillic and Greek letters that look like Latin ones.
pub(super) fn latin_lookalike(c: char) -> Option<char> {
    Some(match c {
        'а' | 'α' => 'a',
        'в' | 'β' => 'b',
        'с' | 'ϲ' => 'c',
        'ԁ' => 'd',
        'е' | 'ё' | 'ε' => 'e',
        'һ' => 'h',
        'і' | 'ι' | 'ї' => 'i',
        'ј' => 'j',
        'к' | 'κ' => 'k',
        'м' => 'm',
        'п' | 'η' => 'n',
        'о' | 'ο' | 'σ' => 'o',
        'р' | 'ρ' => 'p',
        'ԛ' => 'q',
        'г' => 'r',
        'ѕ' => 's',
        'т' | 'τ' => 't',
        'υ' | 'ц' => 'u',
        'ν' => 'v',
        'ш' | 'ω' => 'w',
        'х' | 'χ' => 'x',
        'у' | 'γ' => 'y',
        'ᴢ' => 'z',
        _ => return None,
    })
}

/// NFKC, invisible characters removed, look-alike letters inside Latin words mapped to Latin,
/// lowercased, runs of spaces and tabs collapsed (newlines kept: role markers are per line).
pub(super) fn normalise(text: &str) -> Normalised {
    let mut disguised = false;
    let folded: String = text.nfkc().collect();
    let chars: Vec<char> = folded.chars().collect();
    let mut visible: Vec<char> = Vec::with_capacity(chars.len());
    for (i, &c) in chars.iter().enumerate() {
        if is_invisible(c) {
            let between_letters = i > 0
                && chars[i - 1].is_alphabetic()
                && chars.get(i + 1).is_some_and(|n| n.is_alphabetic());
            disguised |= between_letters;
            continue;
        }
        visible.push(c);
    }
    let mut out = String::with_capacity(visible.len());
    let mut word: Vec<char> = Vec::new();
    let mut last_space = false;
    let flush = |word: &mut Vec<char>, out: &mut String, disguised: &mut bool| {
        // Map look-alikes only in words that mix them with Latin letters: a word wholly in
        // Cyrillic or Greek is genuine text in that script.
        let latin = word.iter().any(|c| c.is_ascii_alphabetic());
        let lookalike = word.iter().any(|c| latin_lookalike(*c).is_some());
        let foreign = word
            .iter()
            .any(|c| c.is_alphabetic() && !c.is_ascii() && latin_lookalike(*c).is_none());
        let map = latin && lookalike && !foreign;
        *disguised |= map;
        for &c in word.iter() {
            let c = if map {
                latin_lookalike(c).unwrap_or(c)
            } else {
                c
            };
            out.extend(c.to_lowercase());
        }
        word.clear();
    };
    for c in visible {
        if c.is_alphanumeric() {
            word.push(c);
            last_space = false;
            continue;
        }
        flush(&mut word, &mut out, &mut disguised);
        if c == ' ' || c == '\t' || c == '\u{a0}' {
            if !last_space {
                out.push(' ');
            }
            last_space = true;
        } else {
            out.push(c);
            last_space = c == '\n';
        }
    }
    flush(&mut word, &mut out, &mut disguised);
    Normalised {
        text: out,
        disguised,
    }
}

pub(super) static SPACED: LazyLock<Vec<Regex>> = LazyLock::new(|| {
    [r" ", r"\.", r"-", r"_", r"\*"]
        .iter()
        .filter_map(|sep| Regex::new(&format!(r"(?i)\b(?:[a-z]{sep}){{4,}}[a-z]\b")).ok())
        .collect()
});

/// Words written letter by letter (`i g n o r e  p r e v i o u s`, `i.g.n.o.r.e`) joined back
/// up (a wider gap, or another separator, ends a word); `None` when there are none.
pub(super) fn join_spaced_letters(text: &str) -> Option<String> {
    let mut out = text.to_string();
    let mut changed = false;
    for re in SPACED.iter() {
        if re.is_match(&out) {
            changed = true;
            out = re
                .replace_all(&out, |c: &regex::Captures<'_>| {
                    c[0].chars()
                        .filter(|ch| ch.is_ascii_alphabetic())
                        .collect::<String>()
                })
                .into_owned();
        }
    }
    changed.then_some(out)
}

/// Words that mix letters with digits or symbols standing for letters (`1gn0r3`) read as
/// letters; `None` when there are none.
pub(super) fn unleet(text: &str) -> Option<String> {
    let mut changed = false;
    let out: Vec<String> = text
        .split(' ')
        .map(|w| {
            let letters = w.chars().filter(|c| c.is_ascii_alphabetic()).count();
            let leet = w
                .chars()
                .filter(|c| matches!(c, '0' | '1' | '3' | '4' | '5' | '7' | '@' | '$' | '!'))
                .count();
            if letters >= 1 && leet >= 1 && letters + leet >= 3 {
                changed = true;
                w.chars()
                    .map(|c| match c {
                        '0' => 'o',
                        '1' | '!' => 'i',
                        '3' => 'e',
                        '4' | '@' => 'a',
                        '5' | '$' => 's',
                        '7' => 't',
                        other => other,
                    })
                    .collect()
            } else {
                w.to_string()
            }
        })
        .collect();
    changed.then(|| out.join(" "))
}

pub(super) static HIDDEN: LazyLock<Vec<Regex>> = LazyLock::new(|| {
    [
        // HTML comments.
        r"(?s)<!--(.*?)-->",
        // Elements hidden by style or attribute.
        r#"(?is)<(\w+)[^>]*(?:display\s*:\s*none|visibility\s*:\s*hidden|font-size\s*:\s*0|opacity\s*:\s*0|\shidden\b|aria-hidden\s*=\s*"true"|color\s*:\s*(?:white|#fff\b|#ffffff))[^>]*>(.*?)</\w+>"#,
        // Markdown comments and link definitions: `[//]: # (text)`, `[x]: url "title"`.
        r#"(?m)^\s*\[[^\]]*\]:\s*\S+\s+(?:"([^"]*)"|\(([^)]*)\)|'([^']*)')"#,
        // Link and image titles: `[text](url "title")`.
        r#"\]\(\s*\S+\s+"([^"]+)"\s*\)"#,
        // Image alt text.
        r"!\[([^\]]{12,})\]",
    ]
    .iter()
    .filter_map(|p| Regex::new(p).ok())
    .collect()
});

/// Text a human reader of the rendered content would not see.
pub(super) fn hidden_segments(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for re in HIDDEN.iter() {
        for caps in re.captures_iter(text) {
            if let Some(m) = caps.iter().skip(1).flatten().last() {
                let s = m.as_str().trim();
                if !s.is_empty() {
                    out.push(s.to_string());
                }
            }
        }
    }
    out
}

pub(super) static BASE64_RUN: LazyLock<Option<Regex>> =
    LazyLock::new(|| Regex::new(r"[A-Za-z0-9+/_-]{16,}={0,2}").ok());
pub(super) static HEX_RUN: LazyLock<Option<Regex>> =
    LazyLock::new(|| Regex::new(r"(?i)(?:\\x|0x|\b)(?:(?:\\x|0x)?[0-9a-f]{2}[\s:,]?){12,}").ok());

/// Base64 and hex runs that decode to readable text, each with the name of its encoding.
pub(super) fn decoded_payloads(text: &str) -> Vec<(&'static str, String)> {
    use base64::Engine as _;
    let mut out = Vec::new();
    if let Some(re) = BASE64_RUN.as_ref() {
        for m in re.find_iter(text) {
            let run = m.as_str().trim_end_matches('=');
            let engines = [
                base64::engine::general_purpose::STANDARD_NO_PAD,
                base64::engine::general_purpose::URL_SAFE_NO_PAD,
            ];
            for engine in engines {
                // A run's length may be off by padding or a stray character at its end.
                let usable = run.len() - run.len() % 4;
                let candidates = [run, &run[..usable]];
                if let Some(text) = candidates
                    .iter()
                    .filter_map(|c| engine.decode(c).ok())
                    .find_map(|bytes| readable(&bytes))
                {
                    out.push(("base64", text));
                    break;
                }
            }
        }
    }
    if let Some(re) = HEX_RUN.as_ref() {
        for m in re.find_iter(text) {
            let digits: String = m
                .as_str()
                .to_ascii_lowercase()
                .replace("\\x", "")
                .replace("0x", "")
                .chars()
                .filter(|c| c.is_ascii_hexdigit())
                .collect();
            if !digits.len().is_multiple_of(2) {
                continue;
            }
            if let Ok(bytes) = hex::decode(&digits)
                && let Some(text) = readable(&bytes)
            {
                out.push(("hex", text));
            }
        }
    }
    out
}

/// `bytes` as text, if it is UTF-8 that reads like words (letters and spaces, few controls).
pub(super) fn readable(bytes: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(bytes).ok()?;
    let total = text.chars().count();
    if total < 8 {
        return None;
    }
    let letters = text.chars().filter(|c| c.is_alphabetic()).count();
    let spaces = text.chars().filter(|c| c.is_whitespace()).count();
    let controls = text
        .chars()
        .filter(|c| c.is_control() && !c.is_whitespace())
        .count();
    (controls == 0 && letters * 10 >= total * 6 && spaces >= 1).then(|| text.to_string())
}

/// ROT13 of ASCII letters.
pub(super) fn rot13(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            'a'..='z' => (((c as u8 - b'a') + 13) % 26 + b'a') as char,
            'A'..='Z' => (((c as u8 - b'A') + 13) % 26 + b'A') as char,
            other => other,
        })
        .collect()
}
