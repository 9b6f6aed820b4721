//! Secret settings: given inline, from the environment, or as a `KEY_file` path (Kubernetes
//! Secret mounts), never two of them, never empty; held as `secrecy` types. [`SecretKey`] names
//! every one of them once: which keys the environment must pass through untouched, and how
//! each is read.

use std::path::PathBuf;

use secrecy::{ExposeSecret, SecretString};

use super::{ConfigError, Settings, ENV_PREFIX};

/// Every secret setting that is one value, given inline or as `KEY_file` (the lists and maps of
/// secrets, `pagerduty.webhook_secrets` and `pagerduty.routing_keys`, are read by serde alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SecretKey {
    StoreUrl,
    WebhookBearerToken,
    WebhookBasicAuthPassword,
    ApiBearerToken,
    ApiReadToken,
    SlackBotToken,
    SlackSigningSecret,
    PagerdutyRoutingKey,
    PagerdutyActionToken,
    StatuspageApiKey,
}

/// A secret setting as the settings hold it: the inline value and the `_file` path.
type Given<'a> = (Option<&'a SecretString>, Option<&'a PathBuf>);

impl SecretKey {
    pub(super) const ALL: [SecretKey; 10] = [
        SecretKey::StoreUrl,
        SecretKey::WebhookBearerToken,
        SecretKey::WebhookBasicAuthPassword,
        SecretKey::ApiBearerToken,
        SecretKey::ApiReadToken,
        SecretKey::SlackBotToken,
        SecretKey::SlackSigningSecret,
        SecretKey::PagerdutyRoutingKey,
        SecretKey::PagerdutyActionToken,
        SecretKey::StatuspageApiKey,
    ];

    /// The settings key (`_file` appended: the key of its file).
    pub(super) fn key(self) -> &'static str {
        match self {
            SecretKey::StoreUrl => "store.url",
            SecretKey::WebhookBearerToken => "webhook.bearer_token",
            SecretKey::WebhookBasicAuthPassword => "webhook.basic_auth.password",
            SecretKey::ApiBearerToken => "api.bearer_token",
            SecretKey::ApiReadToken => "api.read_token",
            SecretKey::SlackBotToken => "slack.bot_token",
            SecretKey::SlackSigningSecret => "slack.signing_secret",
            SecretKey::PagerdutyRoutingKey => "pagerduty.routing_key",
            SecretKey::PagerdutyActionToken => "pagerduty.action_token",
            SecretKey::StatuspageApiKey => "statuspage.api_key",
        }
    }

    /// What the settings hold for it; `None` when its section is absent.
    fn given(self, s: &Settings) -> Option<Given<'_>> {
        match self {
            SecretKey::StoreUrl => Some((s.store.url.as_ref(), s.store.url_file.as_ref())),
            SecretKey::WebhookBearerToken => {
                Some((s.webhook.bearer_token.as_ref(), s.webhook.bearer_token_file.as_ref()))
            }
            SecretKey::WebhookBasicAuthPassword => {
                (s.webhook.basic_auth.as_ref()).map(|b| (b.password.as_ref(), b.password_file.as_ref()))
            }
            SecretKey::ApiBearerToken => Some((s.api.bearer_token.as_ref(), s.api.bearer_token_file.as_ref())),
            SecretKey::ApiReadToken => Some((s.api.read_token.as_ref(), s.api.read_token_file.as_ref())),
            SecretKey::SlackBotToken => (s.slack.as_ref()).map(|x| (x.bot_token.as_ref(), x.bot_token_file.as_ref())),
            SecretKey::SlackSigningSecret => {
                (s.slack.as_ref()).map(|x| (x.signing_secret.as_ref(), x.signing_secret_file.as_ref()))
            }
            SecretKey::PagerdutyRoutingKey => {
                (s.pagerduty.as_ref()).map(|x| (x.routing_key.as_ref(), x.routing_key_file.as_ref()))
            }
            SecretKey::PagerdutyActionToken => {
                (s.pagerduty.as_ref()).map(|x| (x.action_token.as_ref(), x.action_token_file.as_ref()))
            }
            SecretKey::StatuspageApiKey => {
                (s.statuspage.as_ref()).map(|x| (x.api_key.as_ref(), x.api_key_file.as_ref()))
            }
        }
    }

    /// Its value: inline or read from its file, never both, never empty; `None` when not given.
    pub(super) fn read(self, s: &Settings) -> Result<Option<SecretString>, ConfigError> {
        let Some((value, file)) = self.given(s) else {
            return Ok(None);
        };
        let key = self.key();
        match (value, file) {
            (Some(_), Some(_)) => Err(ConfigError(format!("{key}: set either {key} or {key}_file, not both"))),
            (Some(v), None) if v.expose_secret().trim().is_empty() => {
                Err(ConfigError(format!("{key}: is empty; remove it or give it a value")))
            }
            (Some(v), None) => Ok(Some(v.clone())),
            (None, Some(f)) => {
                let text = std::fs::read_to_string(f)
                    .map_err(|e| ConfigError(format!("{key}_file: cannot read {}: {e}", f.display())))?;
                let text = text.trim_end_matches(['\n', '\r']).to_string();
                if text.is_empty() {
                    return Err(ConfigError(format!("{key}_file: {} is empty", f.display())));
                }
                Ok(Some(SecretString::from(text)))
            }
            (None, None) => Ok(None),
        }
    }

    /// [`SecretKey::read`] for a secret its section cannot work without: absent while the
    /// section is present is the error `missing`, which says how to give it.
    pub(super) fn require(self, s: &Settings, missing: &str) -> Result<Option<SecretString>, ConfigError> {
        match self.read(s)? {
            None if self.given(s).is_some() => Err(ConfigError(missing.into())),
            v => Ok(v),
        }
    }
}

/// Keys whose values are secrets (their `_file` siblings are paths, not secrets): taken from
/// the environment exactly as given, never parsed as numbers.
pub(super) fn is_secret_key(key: &str) -> bool {
    SecretKey::ALL.iter().any(|k| k.key() == key)
        || key == "pagerduty.webhook_secrets"
        || key.starts_with("pagerduty.routing_keys.")
}

/// A deserializer's message without the value it quotes (`invalid type: string "xoxb-..",
/// expected a sequence`): the value may be a secret, and the key and the expected shape say
/// what to fix.
pub(super) fn hide_values(msg: &str) -> String {
    static LITERAL: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r#"(invalid (?:type|value|length): [a-z ]*?) ?(?:"(?:[^"\\]|\\.)*"|`[^`]*`)"#)
            .expect("a valid regex")
    });
    LITERAL.replace_all(msg, "$1 (value not shown)").into_owned()
}

/// Every webhook secret must have a value: an HMAC under an empty key is one anybody can
/// compute, so an empty entry (`""`, or the trailing comma of `old,new,` in the environment)
/// would let anyone sign a PagerDuty webhook.
pub(super) fn webhook_secrets_ok(secrets: &[SecretString]) -> Result<(), ConfigError> {
    match secrets.iter().position(|s| s.expose_secret().trim().is_empty()) {
        Some(i) => Err(ConfigError(format!(
            "pagerduty.webhook_secrets: entry {} of {} is empty; remove it or give it a value \
             ({ENV_PREFIX}__PAGERDUTY__WEBHOOK_SECRETS is comma-separated: no empty items, no trailing comma)",
            i + 1,
            secrets.len()
        ))),
        None => Ok(()),
    }
}
