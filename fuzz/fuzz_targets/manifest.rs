//! `agentq::executor::parse_manifest` (a task kind's `worker.toml`): never
//! panics; an error is one line naming the file; an accepted manifest has a
//! program, a timeout above zero, no zero memory cap and only variable
//! names in `env`; writing it back out as TOML (canonical durations and
//! sizes) parses to the same manifest.
#![no_main]

use std::path::Path;

use agentq::executor::parse_manifest;
use agentq::model::units::{format_duration, format_size};
use libfuzzer_sys::fuzz_target;
use serde::Serialize;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // Mostly a manifest for kind "k"; a first byte of 0x01 puts the kind
    // name on the first line, to fuzz the name check as well.
    let (kind, toml) = match text.strip_prefix('\u{1}') {
        Some(rest) => rest.split_once('\n').unwrap_or((rest, "")),
        None => ("k", &*text),
    };
    check(kind, toml);
});

#[derive(Serialize)]
struct Out<'a> {
    command: &'a [String],
    timeout: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    memory: Option<String>,
    env: &'a [String],
}

fn check(kind: &str, text: &str) {
    let dir = Path::new("/w/k");
    let m = match parse_manifest(kind, dir, text) {
        Ok(m) => m,
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "error on one line: {msg:?}");
            assert!(
                msg.starts_with(&format!("{}/worker.toml: ", dir.display())),
                "error names the file: {msg:?}"
            );
            return;
        }
    };
    assert!(agentq::executor::manifest::valid_kind_name(kind));
    assert_eq!(m.kind, kind);
    assert!(!m.command.is_empty() && !m.command[0].is_empty());
    assert!(m.command.iter().all(|a| !a.contains('\0')));
    assert!(!m.timeout.is_zero());
    assert_ne!(m.memory, Some(0));
    assert!(
        m.env
            .iter()
            .all(|n| !n.is_empty() && !n.contains(['=', '\0']))
    );
    let out = toml::to_string(&Out {
        command: &m.command,
        timeout: format_duration(m.timeout),
        memory: m.memory.map(format_size),
        env: &m.env,
    })
    .expect("serialize");
    let again = parse_manifest(kind, dir, &out)
        .unwrap_or_else(|e| panic!("canonical form refused: {e}\n{out}"));
    assert_eq!(m, again, "{out}");
}
