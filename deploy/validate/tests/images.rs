//! `scripts/images` builds images that are whole: each OCI layout unpacks with umoci (which checks
//! the index, manifest, config and every digest), and every program in it runs from the unpacked
//! root alone (`unshare --root`, with new mount, PID and network namespaces and only the image's
//! environment); building twice gives the same bytes.
//!
//! It packs the debug binaries the workspace's tests already built (`target/debug`), not a
//! release build: the packing is the same, and a release build of four programs costs CI more
//! than the rest of this crate. Needs root (unshare); skipped with a message otherwise, except in
//! CI (`CI=true`), where that is a failure.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use mesh_deploy_tests::manifests::{have, workspace};
use serde_json::Value;

const IMAGES: [(&str, &[&str]); 4] = [
    ("istiod-lite", &["istiod-lite"]),
    ("mesh-node-agent", &["mesh-node-agent", "mesh-cni"]),
    ("waypoint", &["waypoint"]),
    ("ztunnel", &["ztunnel"]),
];

fn root(test: &str) -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test}: needs root (unshare --root), and CI=true requires it to run"
    );
    eprintln!("SKIPPED {test}: needs root (unshare --root)");
    false
}

/// `target/debug`: the directory of this test's executable is `target/debug/deps`.
fn debug_binaries(test: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent()?.parent()?.to_owned();
    let missing: Vec<&str> = IMAGES
        .iter()
        .flat_map(|(_, binaries)| binaries.iter().copied())
        .filter(|b| !dir.join(b).is_file())
        .collect();
    if missing.is_empty() {
        return Some(dir);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test}: {missing:?} not built in {} (cargo test --workspace builds them)",
        dir.display()
    );
    eprintln!(
        "SKIPPED {test}: {missing:?} not built in {} (run cargo test --workspace)",
        dir.display()
    );
    None
}

/// A directory removed with its contents when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(label: &str) -> Self {
        let path = std::env::temp_dir().join(format!("mesh-images-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn images_script(bin_dir: &Path, out: &Path, images: &[&str]) -> Output {
    let output = Command::new(workspace().join("scripts/images"))
        .arg("--bin-dir")
        .arg(bin_dir)
        .arg("--out")
        .arg(out)
        .args(images)
        .output()
        .expect("scripts/images runs");
    assert!(
        output.status.success(),
        "scripts/images failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Runs `program args` from `rootfs` alone, with `env` only.
fn run_isolated(rootfs: &Path, env: &[(String, String)], program: &str, args: &[&str]) -> Output {
    Command::new(unshare())
        .args(["--mount", "--pid", "--net", "--fork"])
        .arg(format!("--root={}", rootfs.display()))
        .arg(program)
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("unshare runs")
}

/// `unshare` found on this process's PATH (the child's environment is the image's alone).
fn unshare() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("unshare"))
        .find(|p| p.is_file())
        .expect("unshare (util-linux) on PATH")
}

fn text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

#[test]
fn every_image_unpacks_and_its_programs_run_from_its_root_alone() {
    let test = "every_image_unpacks_and_its_programs_run_from_its_root_alone";
    if !root(test) || !have(test, "umoci", &["--version"]) || !have(test, "jq", &["--version"]) {
        return;
    }
    let Some(bin_dir) = debug_binaries(test) else {
        return;
    };
    let scratch = Scratch::new("build");
    let out = scratch.0.join("images");
    let built = images_script(&bin_dir, &out, &[]);
    let summary = String::from_utf8_lossy(&built.stdout).into_owned();
    eprintln!("{summary}");
    let tag = summary
        .split_whitespace()
        .next()
        .unwrap()
        .rsplit_once(':')
        .unwrap()
        .1
        .to_owned();

    for (image, binaries) in IMAGES {
        assert!(out.join(format!("{image}.oci.tar")).is_file(), "{image}: the archive");
        let bundle = scratch.0.join(format!("bundle-{image}"));
        let unpacked = Command::new("umoci")
            .arg("unpack")
            .arg("--image")
            .arg(format!("{}:{tag}", out.join(image).display()))
            .arg(&bundle)
            .output()
            .unwrap();
        assert!(unpacked.status.success(), "umoci unpack {image}: {}", text(&unpacked));
        let config: Value = serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
        let entrypoint = config["process"]["args"][0].as_str().unwrap().to_owned();
        assert_eq!(entrypoint, format!("/usr/local/bin/{}", binaries[0]), "{image}");
        let env: Vec<(String, String)> = config["process"]["env"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e.as_str()?.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
            .collect();
        let rootfs = bundle.join("rootfs");

        let help = run_isolated(&rootfs, &env, &entrypoint, &["--help"]);
        assert!(help.status.success(), "{image}: {entrypoint} --help: {}", text(&help));
        let usage = format!("Usage: {}", binaries[0]);
        assert!(text(&help).contains(&usage), "{image}: {}", text(&help));

        if image == "mesh-node-agent" {
            // The plugin run by hand (no CNI_COMMAND) says what it is.
            let plugin = run_isolated(&rootfs, &env, "/usr/local/bin/mesh-cni", &[]);
            assert!(plugin.status.success(), "mesh-cni: {}", text(&plugin));
            assert!(text(&plugin).starts_with("mesh-cni: the ambient mesh's chained CNI plugin"));
            // The init containers' commands (deploy/kubernetes/node/node-agent.yaml).
            for tool in ["/bin/cp", "/bin/mv"] {
                let ran = run_isolated(&rootfs, &env, tool, &["--version"]);
                assert!(ran.status.success(), "{tool}: {}", text(&ran));
            }
        }
        let user = &config["process"]["user"]["uid"];
        let expected = if matches!(image, "istiod-lite" | "waypoint") {
            1337
        } else {
            0
        };
        assert_eq!(user, expected, "{image}: the image's default user");
    }

    // The same binaries give the same image, byte for byte.
    let again = scratch.0.join("again");
    images_script(&bin_dir, &again, &["ztunnel"]);
    let index = |dir: &Path| std::fs::read(dir.join("ztunnel/index.json")).unwrap();
    assert_eq!(
        index(&out),
        index(&again),
        "the index (and so every digest) is the same"
    );
    let archive = |dir: &Path| std::fs::read(dir.join("ztunnel.oci.tar")).unwrap();
    assert!(archive(&out) == archive(&again), "the archive is the same");
}
