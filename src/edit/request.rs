//! Edit requests: a single prompt/target, or JSON lists in the CounterFact/EasyEdit shape
//! (`prompt`, `target_new`, ...) or the ROME shape (`prompt` with `{}`, `subject`,
//! `target_new: {"str": ...}`).

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One fact to edit, with the optional prompts used to evaluate it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EditRequest {
    /// Record id, when the data has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub case_id: Option<u64>,
    /// The prompt whose continuation is edited, fully formatted.
    pub prompt: String,
    /// The new continuation (a leading space is added when tokenizing).
    pub target_new: String,
    /// The subject inside the prompt, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// The original continuation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ground_truth: Option<String>,
    /// A paraphrase of the prompt that should also change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rephrase_prompt: Option<String>,
    /// An unrelated prompt that should not change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality_prompt: Option<String>,
    /// The locality prompt's true continuation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality_ground_truth: Option<String>,
}

/// ROME's request shape.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RomeRequest {
    #[serde(default)]
    case_id: Option<u64>,
    prompt: String,
    subject: String,
    target_new: RomeTarget,
    #[serde(default)]
    target_true: Option<RomeTarget>,
}

#[derive(Deserialize)]
struct RomeTarget {
    str: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum AnyRequest {
    Rome(RomeRequest),
    Flat(EditRequest),
}

impl EditRequest {
    /// A request from a prompt and target given on the command line.
    pub fn new(prompt: &str, target: &str, subject: Option<&str>) -> Result<EditRequest> {
        let req = EditRequest {
            case_id: None,
            prompt: prompt.to_string(),
            target_new: target.to_string(),
            subject: subject.map(str::to_string),
            ground_truth: None,
            rephrase_prompt: None,
            locality_prompt: None,
            locality_ground_truth: None,
        };
        req.validate()?;
        Ok(req)
    }

    /// Rejects empty prompts and targets, and a subject that is not in the prompt.
    pub fn validate(&self) -> Result<()> {
        if self.prompt.trim().is_empty() {
            return Err(Error::BadRequest("the prompt is empty".into()));
        }
        if self.target_new.trim().is_empty() {
            return Err(Error::BadRequest("the target is empty".into()));
        }
        if !self
            .target_new
            .chars()
            .any(|c| !c.is_whitespace() && !c.is_control())
        {
            return Err(Error::BadRequest(format!(
                "the target {:?} has no visible character",
                self.target_new
            )));
        }
        for (what, p) in [
            ("rephrase_prompt", &self.rephrase_prompt),
            ("locality_prompt", &self.locality_prompt),
        ] {
            if p.as_ref().is_some_and(|p| p.trim().is_empty()) {
                return Err(Error::BadRequest(format!("the {what} is empty")));
            }
        }
        if let Some(s) = &self.subject {
            if !s.is_empty() && !self.prompt.contains(s.as_str()) {
                return Err(Error::BadRequest(format!(
                    "subject '{s}' does not occur in the prompt '{}'",
                    self.prompt
                )));
            }
        }
        Ok(())
    }

    /// Reads a JSON file holding one request or a list of them, in either shape.
    pub fn load_file(path: &Path) -> Result<Vec<EditRequest>> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text).map_err(|problem| Error::Json {
            path: path.to_path_buf(),
            problem,
        })
    }

    /// Parses JSON text (one request or a list).
    pub fn parse(text: &str) -> std::result::Result<Vec<EditRequest>, String> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let items = match value {
            serde_json::Value::Array(items) => items,
            single @ serde_json::Value::Object(_) => vec![single],
            _ => return Err("expected a request object or a list of them".into()),
        };
        if items.is_empty() {
            return Err("the request list is empty".into());
        }
        items
            .into_iter()
            .enumerate()
            .map(|(i, item)| {
                let req = match serde_json::from_value::<AnyRequest>(item) {
                    Ok(AnyRequest::Rome(r)) => EditRequest {
                        case_id: r.case_id,
                        prompt: r.prompt.replace("{}", &r.subject),
                        target_new: r.target_new.str,
                        subject: Some(r.subject),
                        ground_truth: r.target_true.map(|t| t.str),
                        rephrase_prompt: None,
                        locality_prompt: None,
                        locality_ground_truth: None,
                    },
                    Ok(AnyRequest::Flat(r)) => r,
                    Err(_) => {
                        return Err(format!(
                            "request #{i}: needs 'prompt' and 'target_new' (a string, or {{\"str\": ...}} with 'subject')"
                        ))
                    }
                };
                req.validate().map_err(|e| format!("request #{i}: {e}"))?;
                Ok(req)
            })
            .collect()
    }
}

/// Refuses two requests that edit the same prompt toward different targets, for every method
/// (docs/methods.md: a request file may repeat a fact only with the same target; neither a joint
/// solve nor a sequence can satisfy both, and "last wins" would silently drop a fact).
pub fn refuse_conflicts(requests: &[EditRequest]) -> Result<()> {
    let mut seen: std::collections::HashMap<&str, (usize, &str)> = Default::default();
    for (i, r) in requests.iter().enumerate() {
        if let Some(&(j, target)) = seen.get(r.prompt.as_str()) {
            if target != r.target_new {
                return Err(Error::BadRequest(format!(
                    "requests #{j} and #{i} edit the prompt {:?} toward different targets ({target:?}, {:?})",
                    r.prompt, r.target_new
                )));
            }
        }
        seen.insert(&r.prompt, (i, &r.target_new));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_shapes_parse() {
        let flat = r#"[{"prompt": "A plays for", "target_new": "B", "subject": "A"}]"#;
        let rome = r#"{"prompt": "{} plays for", "subject": "A", "target_new": {"str": "B"}}"#;
        assert_eq!(EditRequest::parse(flat), EditRequest::parse(rome));
        assert!(EditRequest::parse(r#"[{"prompt": "x"}]"#).is_err());
        assert!(EditRequest::parse(r#"[{"prompt": "x", "target_new": " "}]"#).is_err());
    }
}
