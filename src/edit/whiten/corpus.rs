//! The prompts: the corpus the statistics are accumulated over (the built-in prompts live in
//! `prompts.txt`, data rather than code), and the contrast and context variants of an edit
//! prompt.

use crate::edit::EditRequest;
use crate::{Error, Result};
use std::path::PathBuf;

/// The built-in statistics prompts, one a line (lines starting with `#` are comments).
const BUILTIN_PROMPTS: &str = include_str!("prompts.txt");

/// The prompts the statistics are accumulated over.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum StatsCorpus {
    /// The built-in set of generic factual prompts and sentences ([`builtin_prompts`]).
    #[default]
    Builtin,
    /// A file: CounterFact-shaped JSON records (their `prompt`, `rephrase_prompt` and
    /// `locality_prompt` strings, records `skip..` only) or plain text (one prompt a line, lines
    /// `skip..` only).
    File {
        /// The file.
        path: PathBuf,
        /// Records (or lines) skipped from the start.
        skip: usize,
    },
}

impl StatsCorpus {
    /// The prompt strings.
    pub fn prompts(&self) -> Result<Vec<String>> {
        match self {
            StatsCorpus::Builtin => Ok(builtin_prompts()),
            StatsCorpus::File { path, skip } => {
                let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
                let prompts: Vec<String> = if text.trim_start().starts_with('[') {
                    EditRequest::load_file(path)?
                        .into_iter()
                        .skip(*skip)
                        .flat_map(|r| {
                            [Some(r.prompt), r.rephrase_prompt, r.locality_prompt]
                                .into_iter()
                                .flatten()
                        })
                        .collect()
                } else {
                    text.lines()
                        .skip(*skip)
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(String::from)
                        .collect()
                };
                if prompts.is_empty() {
                    return Err(Error::Invalid(format!(
                        "{}: no statistics prompts after skipping {skip}",
                        path.display()
                    )));
                }
                Ok(prompts)
            }
        }
    }

    /// A short description for cache headers and reports.
    pub fn describe(&self) -> String {
        match self {
            StatsCorpus::Builtin => "builtin".into(),
            StatsCorpus::File { path, skip } => format!("{} (from {skip})", path.display()),
        }
    }
}

/// The built-in statistics prompts (`src/edit/whiten/prompts.txt`, in file order): relation
/// templates of many kinds (place, origin, language, employer, maker, genre, ...) filled with
/// made-up subjects of the matching kind, plus generic sentences. Written for backlens; they share
/// no text with CounterFact.
pub fn builtin_prompts() -> Vec<String> {
    BUILTIN_PROMPTS
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

/// Unrelated sentences put before the edit prompt for
/// [`WhitenOptions::context`](super::WhitenOptions::context).
pub const CONTEXT_PREFIXES: &[&str] = &[
    "The weather was cold that morning. ",
    "She closed the book and smiled. ",
    "Prices went up again last month. ",
    "It was a long day at work. ",
    "The children were playing outside. ",
];

/// Contrast subjects: the edit prompt is rerun with its subject replaced by each of these (made-up
/// people, places and products, also subjects of the built-in prompts).
pub const CONTRAST_SUBJECTS: &[&str] = &[
    "Maria Lindqvist",
    "Tomas Brenner",
    "Akira Watanabe",
    "Fatima Haddad",
    "Lake Orrin",
    "Port Amara",
    "Northbridge",
    "Santa Lucena",
    "the Zentra phone",
    "Nordlys Radio",
    "Helix Studio",
    "the Kestrel car",
];

/// The edit prompt with its subject replaced by each contrast subject (empty when the request
/// names no subject or the prompt does not contain it).
pub fn contrast_prompts(req: &EditRequest) -> Vec<String> {
    match req.subject.as_deref() {
        Some(s) if !s.trim().is_empty() && req.prompt.contains(s) => CONTRAST_SUBJECTS
            .iter()
            .filter(|c| **c != s)
            .map(|c| req.prompt.replacen(s, c, 1))
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    #[test]
    fn contrast_prompts_replace_the_subject() {
        let mut req = EditRequest::new("BBC One, by", "Sega", Some("BBC One")).unwrap();
        let p = contrast_prompts(&req);
        assert_eq!(p.len(), CONTRAST_SUBJECTS.len());
        assert_eq!(p[0], format!("{}, by", CONTRAST_SUBJECTS[0]));
        req.subject = None;
        assert!(contrast_prompts(&req).is_empty());
    }

    /// The built-in prompts are exactly the ones the statistics were always computed over (the
    /// list the former code-generated corpus produced): same strings, same order. Cached
    /// statistics and edit results depend on them; update the pin only on purpose.
    #[test]
    fn builtin_prompts_are_pinned() {
        let prompts = builtin_prompts();
        assert_eq!(prompts.len(), 835);
        assert_eq!(prompts[0], "Maria Lindqvist was born in");
        assert_eq!(
            prompts[834],
            "The festival takes place every year in early September."
        );
        let mut h = Sha256::new();
        for p in &prompts {
            assert_eq!(p.trim(), p, "stray whitespace in a built-in prompt");
            h.update(p.as_bytes());
            h.update(b"\n");
        }
        let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "25de8bcc602776c3d90f0a25a67f1c81f0d09a3efc721df634e5a9c8be126c5c"
        );
        for s in CONTRAST_SUBJECTS {
            assert!(prompts.iter().any(|p| p.starts_with(s)), "{s}");
        }
    }
}
