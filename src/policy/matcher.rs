//! Label matchers in Alertmanager's own syntax (`alertname="HighErrorRate"`, `env=~"prod|live"`,
//! `severity!="info"`, `team!~"qa.*"`), so that policy files read like the routes SREs
//! already write. Regexes are anchored, as in Alertmanager.

use std::fmt;

use regex::Regex;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::alert::LabelSet;

/// How a matcher compares a label value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchOp {
    Equal,
    NotEqual,
    Regex,
    NotRegex,
}

impl MatchOp {
    fn as_str(self) -> &'static str {
        match self {
            MatchOp::Equal => "=",
            MatchOp::NotEqual => "!=",
            MatchOp::Regex => "=~",
            MatchOp::NotRegex => "!~",
        }
    }
}

/// One `name op "value"` condition on an alert's labels.
#[derive(Debug, Clone)]
pub struct Matcher {
    pub name: String,
    pub op: MatchOp,
    pub value: String,
    regex: Option<Regex>,
}

impl PartialEq for Matcher {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.op == other.op && self.value == other.value
    }
}

impl Matcher {
    /// Parses `name op value`, where value may be double-quoted.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let op_at = s.find(['=', '!']).ok_or_else(|| {
            format!("matcher {s:?} has no operator: write it as name=\"value\" (operators = != =~ !~)")
        })?;
        let name = s[..op_at].trim();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("matcher {s:?}: label name {name:?} is not a valid label name"));
        }
        let rest = &s[op_at..];
        let (op, raw) = if let Some(r) = rest.strip_prefix("=~") {
            (MatchOp::Regex, r)
        } else if let Some(r) = rest.strip_prefix("!~") {
            (MatchOp::NotRegex, r)
        } else if let Some(r) = rest.strip_prefix("!=") {
            (MatchOp::NotEqual, r)
        } else if let Some(r) = rest.strip_prefix('=') {
            (MatchOp::Equal, r)
        } else {
            return Err(format!("matcher {s:?}: unknown operator, use one of = != =~ !~"));
        };
        let raw = raw.trim();
        // Alertmanager reads a list here: `a="x", b="y"` is two matchers. Taken as one, it
        // would load and never match, so a rollback would silently never happen.
        let one_per_entry =
            || format!("matcher {s:?}: one matcher per list entry; write `a=\"x\", b=\"y\"` as two entries");
        let value = if let Some(quoted) = raw.strip_prefix('"') {
            let (value, after) =
                unquote(quoted).ok_or_else(|| format!("matcher {s:?}: unbalanced quotes around the value"))?;
            match after.trim() {
                "" => value,
                a if a.starts_with(',') => return Err(one_per_entry()),
                a => return Err(format!("matcher {s:?}: unexpected {a:?} after the quoted value")),
            }
        } else if raw.contains('"') {
            return Err(format!("matcher {s:?}: unbalanced quotes around the value"));
        } else if raw.contains(',') {
            return Err(one_per_entry());
        } else {
            raw.to_string()
        };
        let regex = match op {
            MatchOp::Regex | MatchOp::NotRegex => Some(
                Regex::new(&format!("^(?:{value})$"))
                    .map_err(|e| format!("matcher {s:?}: invalid regular expression: {e}"))?,
            ),
            _ => None,
        };
        Ok(Matcher {
            name: name.to_string(),
            op,
            value,
            regex,
        })
    }

    /// Whether the label set satisfies this matcher; a missing label reads as "".
    pub fn matches(&self, labels: &LabelSet) -> bool {
        let v = labels.get(&self.name).map(String::as_str).unwrap_or("");
        match (self.op, &self.regex) {
            (MatchOp::Equal, _) => v == self.value,
            (MatchOp::NotEqual, _) => v != self.value,
            (MatchOp::Regex, Some(r)) => r.is_match(v),
            (MatchOp::NotRegex, Some(r)) => !r.is_match(v),
            (_, None) => false,
        }
    }
}

/// The value of a double-quoted string whose opening quote is already consumed, and the text
/// after its closing quote; `None` without a closing quote. `\"`, `\\` and `\n` are escapes;
/// any other backslash stays as written (regular expressions such as `\d`).
fn unquote(s: &str) -> Option<(String, &str)> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, &s[i + 1..])),
            '\\' => match chars.next() {
                Some((_, '"')) => out.push('"'),
                Some((_, '\\')) => out.push('\\'),
                Some((_, 'n')) => out.push('\n'),
                Some((_, other)) => {
                    out.push('\\');
                    out.push(other);
                }
                None => return None,
            },
            c => out.push(c),
        }
    }
    None
}

impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}{:?}", self.name, self.op.as_str(), self.value)
    }
}

impl<'de> Deserialize<'de> for Matcher {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Matcher::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Matcher {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// True when every matcher matches (an empty list matches everything).
pub fn all_match(matchers: &[Matcher], labels: &LabelSet) -> bool {
    matchers.iter().all(|m| m.matches(labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> LabelSet {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn all_four_operators_behave_like_alertmanager() {
        let l = labels(&[("alertname", "HighErrorRate"), ("env", "prod-eu")]);
        assert!(Matcher::parse("alertname=\"HighErrorRate\"").unwrap().matches(&l));
        assert!(Matcher::parse("alertname = HighErrorRate").unwrap().matches(&l));
        assert!(!Matcher::parse("alertname!=\"HighErrorRate\"").unwrap().matches(&l));
        assert!(Matcher::parse("env=~\"prod.*\"").unwrap().matches(&l));
        // Anchored: "prod" alone must not match "prod-eu".
        assert!(!Matcher::parse("env=~\"prod\"").unwrap().matches(&l));
        assert!(Matcher::parse("env!~\"staging.*\"").unwrap().matches(&l));
        // Missing labels read as the empty string.
        assert!(Matcher::parse("team=\"\"").unwrap().matches(&l));
    }

    #[test]
    fn bad_matchers_say_what_to_write() {
        assert!(Matcher::parse("alertname").unwrap_err().contains("no operator"));
        assert!(Matcher::parse("env=~\"(\"")
            .unwrap_err()
            .contains("invalid regular expression"));
        assert!(Matcher::parse("al-ert=\"x\"")
            .unwrap_err()
            .contains("not a valid label name"));
        assert!(Matcher::parse("a=\"x").unwrap_err().contains("unbalanced"));
        // Alertmanager reads these as two matchers; as one they would never match.
        for s in ["service=\"portal-api\", env=\"prod\"", "service=portal-api, env=prod"] {
            assert!(
                Matcher::parse(s).unwrap_err().contains("one matcher per list entry"),
                "{s}"
            );
        }
        assert!(Matcher::parse("a=\"x\"y\"").unwrap_err().contains("unexpected"));
    }

    #[test]
    fn quoted_values_unescape_like_alertmanager() {
        let m = Matcher::parse(r#"summary="say \"hi\"\\ now""#).unwrap();
        assert_eq!(m.value, r#"say "hi"\ now"#);
        assert_eq!(Matcher::parse(r#"a="x\ny""#).unwrap().value, "x\ny");
        assert_eq!(Matcher::parse(r#"a="b,c""#).unwrap().value, "b,c");
        let r = Matcher::parse(r#"code=~"5\d\d""#).unwrap();
        assert!(r.matches(&labels(&[("code", "503")])));
    }
}
