//! A Dockerfile read into stages and instructions: enough to check its
//! invariants without a container engine.

/// One instruction, continuation lines joined.
#[derive(Debug, Clone)]
pub struct Instruction {
    pub keyword: String,
    pub args: String,
}

/// One `FROM` and what follows it.
#[derive(Debug, Default)]
pub struct Stage {
    pub image: String,
    pub name: Option<String>,
    pub instructions: Vec<Instruction>,
}

impl Stage {
    pub fn all(&self, keyword: &str) -> impl Iterator<Item = &Instruction> {
        let keyword = keyword.to_ascii_uppercase();
        self.instructions.iter().filter(move |i| i.keyword == keyword)
    }
}

pub fn parse(text: &str) -> Vec<Stage> {
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        // Comment lines are dropped, also inside a continued instruction.
        if trimmed.starts_with('#') || trimmed.is_empty() {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                logical.push(std::mem::take(&mut current));
            }
        }
    }
    if !current.is_empty() {
        logical.push(current);
    }

    let mut stages: Vec<Stage> = Vec::new();
    for line in logical {
        let (keyword, args) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
        let keyword = keyword.to_ascii_uppercase();
        let args = args.trim().to_string();
        if keyword == "FROM" {
            let words: Vec<&str> = args.split_whitespace().filter(|w| !w.starts_with("--")).collect();
            let name = match words.as_slice() {
                [_, as_kw, name] if as_kw.eq_ignore_ascii_case("as") => Some(name.to_string()),
                _ => None,
            };
            stages.push(Stage {
                image: words.first().map(|w| w.to_string()).unwrap_or_default(),
                name,
                instructions: Vec::new(),
            });
        } else {
            let stage = stages
                .last_mut()
                .unwrap_or_else(|| panic!("Dockerfile: {keyword} before any FROM"));
            stage.instructions.push(Instruction { keyword, args });
        }
    }
    stages
}

/// `(repository, tag, digest)` of an image reference.
pub fn image_parts(image: &str) -> (String, Option<String>, Option<String>) {
    let (rest, digest) = match image.split_once('@') {
        Some((r, d)) => (r, Some(d.to_string())),
        None => (image, None),
    };
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    match rest[last_slash..].rfind(':') {
        Some(colon) => {
            let at = last_slash + colon;
            (rest[..at].to_string(), Some(rest[at + 1..].to_string()), digest)
        }
        None => (rest.to_string(), None, digest),
    }
}

#[test]
fn image_references_split_into_repository_tag_and_digest() {
    assert_eq!(
        image_parts("gcr.io/distroless/cc-debian12:nonroot@sha256:abc"),
        (
            "gcr.io/distroless/cc-debian12".into(),
            Some("nonroot".into()),
            Some("sha256:abc".into())
        )
    );
    assert_eq!(
        image_parts("localhost:5000/rust"),
        ("localhost:5000/rust".into(), None, None)
    );
    assert_eq!(
        image_parts("rust:1.95.0-slim-bookworm").1.as_deref(),
        Some("1.95.0-slim-bookworm")
    );
}

#[test]
fn continuation_lines_join_and_comments_inside_them_are_skipped() {
    let stages = parse("FROM a:1 AS b\nRUN one \\\n  # note\n  two\nUSER 1\n");
    assert_eq!(stages[0].name.as_deref(), Some("b"));
    assert_eq!(stages[0].instructions[0].args, "one  two");
    assert_eq!(stages[0].instructions[1].keyword, "USER");
}
