//! docs/COMMANDS.md is the `--help` of every command, generated from the real binary. This test
//! fails when the two drift apart; `PKGMESH_UPDATE_DOCS=1 cargo test -p pkgmesh-tests --test
//! cli_reference` rewrites the file.

use pkgmesh_tests::{run_pkgmesh, workspace_root};

/// The subcommand names listed under "Commands:" in a help text.
fn subcommands(help: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut in_commands = false;
    for line in help.lines() {
        if line.starts_with("Commands:") {
            in_commands = true;
            continue;
        }
        if in_commands {
            if line.trim().is_empty() || !line.starts_with("  ") {
                break;
            }
            if let Some(name) = line.split_whitespace().next() {
                if name != "help" && line.starts_with("  ") && !line.starts_with("   ") {
                    names.push(name.to_string());
                }
            }
        }
    }
    names
}

fn help_of(path: &[String]) -> String {
    let mut args: Vec<String> = path.to_vec();
    args.push("--help".into());
    let output = run_pkgmesh(&args);
    assert!(output.status.success(), "{path:?} --help: {output:?}");
    String::from_utf8(output.stdout).expect("help is UTF-8")
}

fn document(path: &mut Vec<String>, out: &mut String) {
    let help = help_of(path);
    let title = if path.is_empty() {
        "pkgmesh".to_string()
    } else {
        format!("pkgmesh {}", path.join(" "))
    };
    out.push_str(&format!(
        "## {title}\n\n```text\n{}\n```\n\n",
        help.trim_end()
    ));
    for name in subcommands(&help) {
        path.push(name);
        document(path, out);
        path.pop();
    }
}

#[test]
fn the_command_reference_matches_the_binary() {
    let mut text = String::from(
        "# pkgmesh command reference\n\n\
         Generated from `pkgmesh ... --help`; regenerate with\n\
         `PKGMESH_UPDATE_DOCS=1 cargo test -p pkgmesh-tests --test cli_reference`.\n\n",
    );
    document(&mut Vec::new(), &mut text);
    let path = workspace_root().join("docs/COMMANDS.md");
    if std::env::var_os("PKGMESH_UPDATE_DOCS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &text).unwrap();
        return;
    }
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        current == text,
        "docs/COMMANDS.md is out of date: run PKGMESH_UPDATE_DOCS=1 cargo test -p pkgmesh-tests --test cli_reference"
    );
    assert!(text.contains("## pkgmesh deploy create"));
}
