//! The packaging a host needs: `config/edge-agent.service` passes `systemd-analyze verify`
//! (installed by `servers/systemd/install.sh`) and has the options the README promises, and
//! `config/edge-agent.env` is accepted by `edge-agent check-config`.
use std::collections::HashMap;
use std::process::Command;

use integration_tests::{agent_bin, workspace_root};

/// `[section]` → key → values (a key may repeat).
fn parse_unit(text: &str) -> HashMap<String, HashMap<String, Vec<String>>> {
    let mut out: HashMap<String, HashMap<String, Vec<String>>> = HashMap::new();
    let mut section = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_string();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not key=value in [{section}]: {line}"));
        out.entry(section.clone())
            .or_default()
            .entry(k.trim().to_string())
            .or_default()
            .push(v.trim().to_string());
    }
    out
}

#[test]
fn the_unit_has_restart_reload_hardening_and_state_directory() {
    let text = std::fs::read_to_string(workspace_root().join("config/edge-agent.service")).unwrap();
    let unit = parse_unit(&text);
    let svc = &unit["Service"];
    let one = |k: &str| -> &str {
        let v = svc.get(k).unwrap_or_else(|| panic!("no {k}= in [Service]"));
        v.last().unwrap()
    };
    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(one("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert!(one("ExecStart").ends_with("/edge-agent"));
    assert_eq!(one("DynamicUser"), "yes");
    assert_eq!(one("ProtectSystem"), "strict");
    assert_eq!(one("NoNewPrivileges"), "yes");
    assert_eq!(one("StateDirectory"), "edge-agent");
    assert_eq!(one("EnvironmentFile"), "-/etc/edge-agent/edge-agent.env");
    assert_eq!(one("Environment"), "EDGE_AGENT_STATE_DIR=%S/edge-agent");
    assert_eq!(unit["Install"]["WantedBy"], vec!["multi-user.target"]);
}

#[test]
fn systemd_analyze_verifies_the_unit() {
    let analyze = Command::new("systemd-analyze").arg("--version").output();
    assert!(
        analyze.is_ok_and(|o| o.status.success()),
        "systemd-analyze is not installed: run integration-tests/servers/systemd/install.sh"
    );
    // verify checks that ExecStart's binary exists: point it at the one just built; every
    // other line is verified as shipped.
    let text = std::fs::read_to_string(workspace_root().join("config/edge-agent.service")).unwrap();
    let text = text.replace(
        "/usr/local/bin/edge-agent",
        &agent_bin().display().to_string(),
    );
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("edge-agent.service");
    std::fs::write(&unit, text).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed ({}):\n{stderr}",
        out.status
    );
    assert!(
        !stderr.contains("edge-agent.service:"),
        "systemd-analyze verify warned:\n{stderr}"
    );
}

#[test]
fn the_env_example_names_known_variables_and_passes_check_config() {
    let text = std::fs::read_to_string(workspace_root().join("config/edge-agent.env")).unwrap();
    let help = Command::new(agent_bin()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout).to_string();
    let mut vars = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        // Commented-out settings (`#VAR=value`) must name real variables too.
        let setting = line.trim_start_matches('#');
        if let Some((k, v)) = setting.split_once('=') {
            if k.chars().all(|c| c.is_ascii_uppercase() || c == '_') && !k.is_empty() {
                assert!(help.contains(k), "{k} is not in `edge-agent --help`");
                if !line.starts_with('#') {
                    vars.push((k.to_string(), v.to_string()));
                }
            }
        }
    }
    assert!(vars.len() >= 5, "{vars:?}");
    let out = Command::new(agent_bin())
        .arg("check-config")
        .env_clear()
        .envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir("/")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "check-config refused config/edge-agent.env:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
