//! Text for Slack's mrkdwn. Slack reads `&`, `<` and `>` as markup: `<!channel>` notifies a
//! whole channel and `<http://x|text>` is a link. Alert labels and annotations, policies and
//! people's reasons are shown as written, never as markup; links are built only from http(s)
//! URLs, with the characters that would end them encoded.

/// A Slack link to an http(s) URL; anything else (a `javascript:` URL, text) is left out. The
/// characters that would end the link or start another (`|`, `>`, `<`, spaces) are
/// percent-encoded, `&` is escaped: an annotation cannot smuggle a mention or a second link.
pub(crate) fn link(url: &Option<String>, text: &str) -> Option<String> {
    let u = url.as_deref()?.trim();
    let lower = u.to_ascii_lowercase();
    if !(lower.starts_with("https://") || lower.starts_with("http://")) {
        return None;
    }
    let mut safe = String::with_capacity(u.len());
    for c in u.chars() {
        match c {
            '<' => safe.push_str("%3C"),
            '>' => safe.push_str("%3E"),
            '|' => safe.push_str("%7C"),
            '&' => safe.push_str("&amp;"),
            c if c.is_whitespace() => safe.push_str("%20"),
            c if c.is_control() => {}
            c => safe.push(c),
        }
    }
    Some(format!("<{safe}|{text}>"))
}

/// Text for Slack's mrkdwn: its three control characters escaped, so text from alerts,
/// policies and people shows as written and never becomes a mention (`<!channel>`) or a link.
pub(crate) fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Text from an alert (labels, annotations) that goes into a line later rendered with
/// [`escape_keeping_mentions`]: a `<@U…>` in it is broken with a word joiner so it shows as
/// written but never pings anyone; only the mentions the responder adds itself stay live.
pub fn defuse_mentions(s: &str) -> String {
    s.replace("<@", "<\u{2060}@")
}

/// [`escape`] for a line the responder wrote, keeping the user mentions (`<@U0ALICE>`) it puts
/// in on purpose to name who acted; everything else in it (alert labels, a person's reason)
/// is escaped.
pub(crate) fn escape_keeping_mentions(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("<@") {
        let tail = &rest[i + 2..];
        let id_len = tail.find(|c: char| !c.is_ascii_alphanumeric()).unwrap_or(tail.len());
        out.push_str(&escape(&rest[..i]));
        if id_len > 0 && tail[id_len..].starts_with('>') {
            out.push_str(&rest[i..i + 2 + id_len + 1]);
            rest = &tail[id_len + 1..];
        } else {
            out.push_str("&lt;@");
            rest = tail;
        }
    }
    out.push_str(&escape(rest));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mentions_and_links_from_alerts_are_shown_as_text() {
        assert_eq!(
            escape("<!channel> 5xx at 6 % & <http://evil.example|click>"),
            "&lt;!channel&gt; 5xx at 6 % &amp; &lt;http://evil.example|click&gt;"
        );
    }

    #[test]
    fn the_responders_own_user_mentions_survive_and_nothing_else() {
        assert_eq!(
            escape_keeping_mentions("approved by <@U0ALICE> for <!here> <@U1|x> <@> a<b"),
            "approved by <@U0ALICE> for &lt;!here&gt; &lt;@U1|x&gt; &lt;@&gt; a&lt;b"
        );
        assert_eq!(escape_keeping_mentions("<@U1><@U2>"), "<@U1><@U2>");
        // An alert's text cannot mention anyone, even inside a line that keeps mentions.
        let joined = format!("{} joined, approved by <@U0ALICE>", defuse_mentions("svc=<@U0CEO>"));
        assert_eq!(
            escape_keeping_mentions(&joined),
            "svc=&lt;\u{2060}@U0CEO&gt; joined, approved by <@U0ALICE>"
        );
        assert_eq!(escape_keeping_mentions("trailing <@U1"), "trailing &lt;@U1");
    }

    #[test]
    fn only_http_urls_become_links_and_cannot_break_out() {
        let l = |u: &str| link(&Some(u.to_string()), "Runbook");
        assert_eq!(
            l("https://runbooks.example/a?b=1&c=2").as_deref(),
            Some("<https://runbooks.example/a?b=1&amp;c=2|Runbook>")
        );
        assert_eq!(
            l("https://x.example/|<!channel>> y").as_deref(),
            Some("<https://x.example/%7C%3C!channel%3E%3E%20y|Runbook>")
        );
        assert_eq!(l("javascript:alert(1)"), None);
        assert_eq!(l("<!channel>"), None);
        assert_eq!(link(&None, "Runbook"), None);
    }
}
