//! The policy parser on any text, alone and as an override of a base
//! policy (how a user's /etc/corral/policy.toml is read over the shipped
//! default; the base is a small one, since parsing the 19 KiB default on
//! every input would cut the rate to a few dozen a second): it returns a
//! policy or an error naming file:line:col, and never panics, also while
//! formatting that error or classifying with the policy it accepted.
#![no_main]

use std::path::Path;

use corral::model::{classify, policy::Policy, procs::ProcInfo};
use libfuzzer_sys::fuzz_target;

const BASE: &str = include_str!("../seeds/policy/override.toml");

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = Path::new("/etc/corral/policy.toml");
    let standalone = Policy::parse(file, text);
    let layered = Policy::parse_layers(&[(Path::new("base.toml"), BASE), (file, text)]);
    for result in [standalone, layered] {
        match result {
            Ok(policy) => {
                let _ = policy.describe_files();
                let _ = policy.env_keys();
                let chain = [ProcInfo {
                    pid: 7,
                    exe: "/usr/bin/steam".into(),
                    comm: "steam".into(),
                    argv: vec!["steam".into(), "-silent".into()],
                    cwd: "/home/u".into(),
                    cgroup: "/user.slice/app.slice/x.scope".into(),
                    env: [("SteamGameId".to_owned(), "42".to_owned())].into(),
                }];
                let _ = classify::classify_chain(&policy, None, &chain);
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
});
