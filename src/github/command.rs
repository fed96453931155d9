//! `/preview …` commands in pull-request comments (`issue_comment` deliveries): the few fields
//! previewd reads, and which command a comment gives. A comment gives one when its first line
//! is `/preview <command>`; anything else in it is for people. Who may command is decided by
//! GitHub's API (write access), never by the payload.

use serde::Deserialize;

use super::event::Repository;

#[derive(Debug, Clone, Deserialize)]
pub struct IssueCommentEvent {
    pub action: String,
    pub issue: Issue,
    pub comment: Comment,
    pub repository: Repository,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Issue {
    pub number: u64,
    /// Present when the issue is a pull request.
    #[serde(default)]
    pub pull_request: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Comment {
    pub id: u64,
    #[serde(default)]
    pub body: String,
    pub user: User,
    /// ISO 8601 in UTC.
    #[serde(default)]
    pub created_at: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct User {
    pub login: String,
}

/// What a `/preview` comment asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Deploy the head commit again (also after a removal by age or a destroy).
    Redeploy,
    /// Remove the preview until the next push or `/preview redeploy`.
    Destroy,
    Wake,
    Sleep,
    Pin,
    Unpin,
    /// Update the sticky comment with the preview's state now.
    Status,
    /// Run a fork's head commit (`allow_forks: approve`); a new push needs a new approval.
    Approve,
}

impl Command {
    pub const ALL: [Command; 8] = [
        Command::Redeploy,
        Command::Destroy,
        Command::Wake,
        Command::Sleep,
        Command::Pin,
        Command::Unpin,
        Command::Status,
        Command::Approve,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Redeploy => "redeploy",
            Self::Destroy => "destroy",
            Self::Wake => "wake",
            Self::Sleep => "sleep",
            Self::Pin => "pin",
            Self::Unpin => "unpin",
            Self::Status => "status",
            Self::Approve => "approve",
        }
    }
}

/// The command of a comment: `None` when it is not a `/preview` comment, an error (saying which
/// commands there are) when it names none of them.
pub fn command_of(body: &str) -> Option<Result<Command, String>> {
    let first = body.trim_start().lines().next()?.trim();
    let rest = first.strip_prefix("/preview")?;
    if !rest.is_empty() && !rest.starts_with(char::is_whitespace) {
        return None;
    }
    let word = rest.split_whitespace().next().unwrap_or_default().to_ascii_lowercase();
    let known = Command::ALL.iter().find(|command| command.as_str() == word).copied();
    Some(known.ok_or_else(|| {
        let names: Vec<String> = Command::ALL.iter().map(|c| format!("`/preview {}`", c.as_str())).collect();
        let asked = if word.is_empty() { "`/preview` alone".to_owned() } else { format!("`/preview {word}`") };
        format!("{asked} is not a command previewd knows; use one of {}", names.join(", "))
    }))
}

/// The word after the command (`/preview approve 1a2b3c4`: `1a2b3c4`), lowercased.
pub fn argument_of(body: &str) -> Option<String> {
    let first = body.trim_start().lines().next()?.trim();
    let mut words = first.strip_prefix("/preview")?.split_whitespace();
    words.next()?;
    words.next().map(str::to_ascii_lowercase)
}

/// Whether `prefix` names commit `sha`: 7 to 40 hex digits it starts with.
pub fn names_commit(prefix: &str, sha: &str) -> bool {
    (7..=40).contains(&prefix.len())
        && prefix.bytes().all(|b| b.is_ascii_hexdigit())
        && sha.to_ascii_lowercase().starts_with(&prefix.to_ascii_lowercase())
}

/// Whether `login` is a GitHub login (letters, digits and single hyphens inside, at most 39):
/// only such a name goes into an API path or a reply.
pub fn is_login(login: &str) -> bool {
    (1..=39).contains(&login.len())
        && login.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !login.starts_with('-')
        && !login.ends_with('-')
        && !login.contains("--")
}

/// Whether a permission GitHub reports (`admin`, `maintain`, `write`, `triage`, `read`,
/// `none`) lets its holder command previews: write access or more.
pub fn may_command(permission: &str) -> bool {
    matches!(permission, "admin" | "maintain" | "write")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_line_gives_the_command_in_any_case() {
        assert_eq!(command_of("/preview redeploy"), Some(Ok(Command::Redeploy)));
        assert_eq!(command_of("  /preview   Destroy please\nbecause it is broken"), Some(Ok(Command::Destroy)));
        assert_eq!(command_of("/preview pin\n"), Some(Ok(Command::Pin)));
    }

    #[test]
    fn other_comments_are_not_commands() {
        assert_eq!(command_of("LGTM"), None);
        assert_eq!(command_of("please /preview redeploy"), None);
        assert_eq!(command_of("/previews redeploy"), None);
        assert_eq!(command_of("first line\n/preview redeploy"), None, "only the first line commands");
        assert_eq!(command_of(""), None);
    }

    #[test]
    fn an_unknown_command_is_answered_with_the_known_ones() {
        let why = command_of("/preview deploy").unwrap().unwrap_err();
        assert!(why.contains("`/preview deploy`") && why.contains("`/preview redeploy`"), "{why}");
        assert!(command_of("/preview").unwrap().unwrap_err().contains("alone"));
    }

    #[test]
    fn an_approval_may_name_the_commit_it_approves() {
        assert_eq!(argument_of("/preview approve 1A2b3c4\nthanks"), Some("1a2b3c4".to_owned()));
        assert_eq!(argument_of("/preview approve"), None);
        let sha = "1a2b3c4d5e6f1a2b3c4d5e6f1a2b3c4d5e6f1a2b";
        assert!(names_commit("1a2b3c4", sha) && names_commit(sha, sha));
        assert!(!names_commit("1a2b3c", sha), "too short");
        assert!(!names_commit("1a2b3c5", sha), "another commit");
        assert!(!names_commit("zzzzzzz", sha));
    }

    #[test]
    fn only_githubs_logins_are_taken() {
        assert!(is_login("octocat") && is_login("a-b1"));
        for bad in ["", "-a", "a-", "a--b", "a/b", "../x", "a?b", &"a".repeat(40)] {
            assert!(!is_login(bad), "{bad}");
        }
    }

    #[test]
    fn write_access_or_more_may_command() {
        for permission in ["admin", "maintain", "write"] {
            assert!(may_command(permission), "{permission}");
        }
        for permission in ["triage", "read", "none", ""] {
            assert!(!may_command(permission), "{permission}");
        }
    }
}
