use std::time::Duration;

use tokio::time::Instant;

use super::*;

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("istiod-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    fn write(&self, file: &str, text: &str) {
        std::fs::write(self.0.join(file), text).unwrap();
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn names(directory: &Directory) -> Vec<String> {
    directory.objects().map(|o| o.key().to_string()).collect()
}

fn messages(scan: &Scan) -> Vec<String> {
    scan.problems.iter().map(ToString::to_string).collect()
}

const GOOD_POD: &str =
    "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: demo}\nspec:\n  containers: [{name: app, image: app}]\n";

/// An ALLOW policy admitting only `admin`, with `source` given as written.
fn policy(source: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: admin-only, namespace: demo}}\nspec:\n  selector: {{matchLabels: {{app: server}}}}\n  rules:\n  - from:\n    - {source}\n"
    )
}

const GOOD_SOURCE: &str = "source: {principals: [cluster.local/ns/demo/sa/admin]}";

fn principals(directory: &Directory) -> Vec<Vec<String>> {
    directory
        .objects()
        .filter_map(|o| match o {
            Object::AuthorizationPolicy(p) => Some(p),
            _ => None,
        })
        .flat_map(|p| p.spec.rules.clone().unwrap_or_default())
        .flat_map(|r| r.from)
        .map(|f| f.source.principals)
        .collect()
}

#[test]
fn bad_documents_are_reported_precisely_and_skipped() {
    let dir = TempDir::new("bad");
    dir.write(
        "demo.yaml",
        &format!(
            "{GOOD_POD}---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: demo}}\nspec:\n  action: ALOW\n---\napiVersion: v1\nkind: Widget\nmetadata: {{name: w}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: demo}}\nspec:\n  ports: [{{port: 80}}]\n"
        ),
    );
    dir.write("notes.txt", "ignored: not yaml");
    let mut directory = Directory::new(&dir.0);
    let problems = messages(&directory.scan(Instant::now()).unwrap());
    assert_eq!(names(&directory), ["Pod/demo/a", "Service/demo/s"]);
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].ends_with("demo.yaml: document 1: AuthorizationPolicy/demo/p: field spec.action: unknown variant `ALOW`, expected one of `ALLOW`, `DENY`, `AUDIT`, `CUSTOM`"), "{}", problems[0]);
    assert!(
        problems[1].ends_with("demo.yaml: document 2: v1 Widget is not a kind istiod-lite reads"),
        "{}",
        problems[1]
    );
}

#[test]
fn an_object_that_turns_bad_keeps_its_last_good_version() {
    let dir = TempDir::new("last-good");
    dir.write(
        "svc.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: demo}\nspec:\n  ports: [{port: 80}]\n",
    );
    let mut directory = Directory::new(&dir.0);
    assert!(directory.scan(Instant::now()).unwrap().problems.is_empty());
    dir.write(
        "svc.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: demo}\nspec:\n  ports: [{port: eighty}]\n",
    );
    let problems = messages(&directory.scan(Instant::now()).unwrap());
    assert_eq!(problems.len(), 1);
    assert!(problems[0].contains("field spec.ports[0].port"), "{}", problems[0]);
    let objects: Vec<Object> = directory.objects().collect();
    let [Object::Service(service)] = objects.as_slice() else {
        panic!("{objects:?}")
    };
    assert_eq!(service.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port, 80);
}

/// Each typo the attack pass used to turn an ALLOW policy into allow-all: the error names the
/// field (and what was expected), and the policy keeps its last good version.
#[test]
fn policy_typos_are_errors_naming_the_field_and_the_last_good_version_stays() {
    let typos = [
        (
            "source: {principal: [cluster.local/ns/demo/sa/admin]}",
            "field spec.rules[0].from[0].source.principal: unknown field `principal`, expected one of `principals`, `notPrincipals`",
        ),
        (
            "source: {principals: []}",
            "field spec.rules[0].from[0].source.principals: written empty",
        ),
        (
            "sources: {principals: [cluster.local/ns/demo/sa/admin]}",
            "field spec.rules[0].from[0].sources: unknown field `sources`, expected `source`",
        ),
        ("{}", "field spec.rules[0].from[0]: written empty"),
        ("source: {}", "field spec.rules[0].from[0].source: written empty"),
    ];
    let dir = TempDir::new("typos");
    let mut directory = Directory::new(&dir.0);
    for (source, expected) in typos {
        dir.write("policy.yaml", &policy(GOOD_SOURCE));
        assert!(directory.scan(Instant::now()).unwrap().problems.is_empty());
        dir.write("policy.yaml", &policy(source));
        let problems = messages(&directory.scan(Instant::now()).unwrap());
        assert_eq!(problems.len(), 1, "{source}: {problems:?}");
        assert!(
            problems[0].contains(&format!("AuthorizationPolicy/demo/admin-only: {expected}")),
            "{source}: {}",
            problems[0]
        );
        assert_eq!(principals(&directory), [["cluster.local/ns/demo/sa/admin"]], "{source}");
    }
    // `form:` for `from:` sits one level up.
    let form = policy(GOOD_SOURCE).replace("- from:", "- form:");
    dir.write("policy.yaml", &form);
    let problems = messages(&directory.scan(Instant::now()).unwrap());
    assert!(
        problems[0].contains("field spec.rules[0].form: unknown field `form`, expected one of `from`, `to`, `when`"),
        "{}",
        problems[0]
    );
    assert_eq!(principals(&directory), [["cluster.local/ns/demo/sa/admin"]]);
}

#[test]
fn a_broken_kind_or_name_keeps_the_files_last_good_objects() {
    let dir = TempDir::new("broken-kind");
    dir.write("demo.yaml", &format!("{GOOD_POD}---\n{}", policy(GOOD_SOURCE)));
    let mut directory = Directory::new(&dir.0);
    directory.scan(Instant::now()).unwrap();
    for broken in [
        policy(GOOD_SOURCE).replace("kind: AuthorizationPolicy", "kind: AuthorizationPolic"),
        policy(GOOD_SOURCE).replace("name: admin-only", "nme: admin-only"),
        policy(GOOD_SOURCE).replace("namespace: demo}", "namespace: demo"),
    ] {
        dir.write("demo.yaml", &format!("{GOOD_POD}---\n{broken}"));
        let scan = directory.scan(Instant::now()).unwrap();
        assert_eq!(scan.problems.len(), 1, "{broken}: {:?}", messages(&scan));
        assert!(scan.held.is_empty(), "kept as the last good state, not merely held");
        assert_eq!(
            names(&directory),
            ["Pod/demo/a", "AuthorizationPolicy/demo/admin-only"],
            "{broken}"
        );
    }
}

#[test]
fn a_file_truncated_to_nothing_keeps_its_objects_for_the_grace_period() {
    let dir = TempDir::new("truncated");
    dir.write("demo.yaml", &format!("{GOOD_POD}---\n{}", policy(GOOD_SOURCE)));
    let start = Instant::now();
    let mut directory = Directory::new(&dir.0);
    directory.scan(start).unwrap();
    for (emptied, text) in [(1, ""), (2, "# nothing yet\n---\n")] {
        let at = start + Duration::from_secs(10 * emptied);
        dir.write("demo.yaml", text);
        let scan = directory.scan(at).unwrap();
        assert_eq!(scan.held.len(), 2, "{text:?}");
        assert!(scan.held.iter().all(|(_, _, left)| *left == Left::FileEmptied));
        assert_eq!(directory.next_deadline(), Some(at + GRACE));
        let kept = directory.scan(at + GRACE - Duration::from_millis(1)).unwrap();
        assert!(kept.removed.is_empty());
        assert_eq!(names(&directory), ["Pod/demo/a", "AuthorizationPolicy/demo/admin-only"]);
        // Still empty once the grace period ends: now it applies.
        let scan = directory.scan(at + GRACE).unwrap();
        assert_eq!(scan.removed.len(), 2);
        assert!(names(&directory).is_empty());
        dir.write("demo.yaml", &format!("{GOOD_POD}---\n{}", policy(GOOD_SOURCE)));
        directory.scan(at + GRACE).unwrap();
    }
}

#[test]
fn a_file_written_in_two_steps_never_loses_its_policy_in_between() {
    let dir = TempDir::new("two-steps");
    dir.write("demo.yaml", &format!("{GOOD_POD}---\n{}", policy(GOOD_SOURCE)));
    let start = Instant::now();
    let mut directory = Directory::new(&dir.0);
    directory.scan(start).unwrap();
    // The first step: the file truncated and its first document written.
    dir.write("demo.yaml", GOOD_POD);
    let scan = directory.scan(start + Duration::from_secs(1)).unwrap();
    assert_eq!(scan.held.len(), 1);
    assert_eq!(scan.held[0].2, Left::FileShortened);
    assert_eq!(names(&directory), ["Pod/demo/a", "AuthorizationPolicy/demo/admin-only"]);
    // The second, a second later: the policy is back, so nothing is removed when the period ends.
    dir.write("demo.yaml", &format!("{GOOD_POD}---\n{}", policy(GOOD_SOURCE)));
    directory.scan(start + Duration::from_secs(2)).unwrap();
    assert_eq!(directory.next_deadline(), None);
    let scan = directory.scan(start + Duration::from_secs(60)).unwrap();
    assert!(scan.removed.is_empty());
    assert_eq!(names(&directory), ["Pod/demo/a", "AuthorizationPolicy/demo/admin-only"]);
}

#[test]
fn removed_files_take_their_objects_with_them_after_the_grace_period() {
    let dir = TempDir::new("removed");
    dir.write("a.yaml", GOOD_POD);
    dir.write(
        "b.yml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}\n",
    );
    let start = Instant::now();
    let mut directory = Directory::new(&dir.0);
    directory.scan(start).unwrap();
    assert_eq!(names(&directory), ["Pod/demo/a", "Namespace/demo"]);
    std::fs::remove_file(dir.0.join("a.yaml")).unwrap();
    let scan = directory.scan(start).unwrap();
    assert_eq!(scan.held[0].2, Left::FileRemoved);
    assert_eq!(names(&directory), ["Namespace/demo", "Pod/demo/a"]);
    directory.scan(start + GRACE).unwrap();
    assert_eq!(names(&directory), ["Namespace/demo"]);
    // An object moving to another file is not held: it never left.
    dir.write("c.yaml", GOOD_POD);
    directory.scan(start + GRACE).unwrap();
    std::fs::rename(dir.0.join("c.yaml"), dir.0.join("d.yaml")).unwrap();
    assert!(directory.scan(start + GRACE).unwrap().held.is_empty());
}

#[test]
fn objects_without_a_namespace_land_in_default() {
    let dir = TempDir::new("default-ns");
    dir.write("p.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n");
    let mut directory = Directory::new(&dir.0);
    directory.scan(Instant::now()).unwrap();
    assert_eq!(names(&directory), ["Pod/default/a"]);
}

mod watching {
    use std::io::Write;
    use std::sync::Arc;

    use super::*;
    use crate::objects::Kind;
    use crate::store::{Objects, Store};

    fn timing(grace: Duration) -> Timing {
        Timing {
            settle: Duration::from_millis(20),
            grace,
            write_timeout: Duration::from_secs(2),
        }
    }

    fn has(objects: &Objects, kind: Kind, name: &str) -> bool {
        objects.iter().any(|o| o.kind() == kind && o.key().name == name)
    }

    /// Polls the store every 5 ms for `period`, checking `invariant` on each snapshot.
    async fn always(store: &Store, period: Duration, invariant: impl Fn(&Objects) -> bool) {
        let until = Instant::now() + period;
        while Instant::now() < until {
            let current = store.current();
            assert!(
                invariant(&current),
                "{:?}",
                current.iter().map(Object::key).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn eventually(store: &Store, within: Duration, condition: impl Fn(&Objects) -> bool) -> Duration {
        let start = Instant::now();
        while !condition(&store.current()) {
            assert!(start.elapsed() < within, "not within {within:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        start.elapsed()
    }

    fn watch(dir: &TempDir, grace: Duration) -> Arc<Store> {
        let store = Arc::new(Store::new());
        let watching = load_with(&dir.0, store.clone(), Metrics::default(), timing(grace)).unwrap();
        tokio::spawn(watching.run());
        store
    }

    #[tokio::test]
    async fn a_zero_byte_truncation_keeps_everything_for_the_grace_period() {
        let dir = TempDir::new("watch-truncate");
        dir.write("demo.yaml", &format!("{GOOD_POD}---\n{}", policy(GOOD_SOURCE)));
        let store = watch(&dir, Duration::from_millis(800));
        assert_eq!(store.current().len(), 2);
        std::fs::File::create(dir.0.join("demo.yaml")).unwrap();
        let truncated = Instant::now();
        always(&store, Duration::from_millis(500), |o| o.len() == 2).await;
        eventually(&store, Duration::from_secs(5), Objects::is_empty).await;
        assert!(
            truncated.elapsed() >= Duration::from_millis(800),
            "{:?}",
            truncated.elapsed()
        );
    }

    #[tokio::test]
    async fn a_file_written_in_two_opens_keeps_its_policy_throughout() {
        let dir = TempDir::new("watch-two-opens");
        dir.write("demo.yaml", &format!("{GOOD_POD}---\n{}", policy(GOOD_SOURCE)));
        let store = watch(&dir, Duration::from_secs(2));
        let writer = async {
            dir.write("demo.yaml", GOOD_POD);
            tokio::time::sleep(Duration::from_millis(400)).await;
            dir.write("demo.yaml", &format!("{GOOD_POD}---\n{}", policy(GOOD_SOURCE)));
        };
        let watcher = always(&store, Duration::from_millis(1500), |o| {
            has(o, Kind::AuthorizationPolicy, "admin-only")
        });
        tokio::join!(writer, watcher);
    }

    #[tokio::test]
    async fn a_file_still_open_for_writing_is_applied_once_closed() {
        let dir = TempDir::new("watch-open");
        dir.write("demo.yaml", &policy(GOOD_SOURCE));
        let store = watch(&dir, Duration::from_secs(5));
        let mut file = std::fs::File::create(dir.0.join("demo.yaml")).unwrap();
        let writer = async {
            file.write_all(GOOD_POD.as_bytes()).unwrap();
            file.flush().unwrap();
            tokio::time::sleep(Duration::from_millis(400)).await;
            let rest = policy(GOOD_SOURCE).replace("admin-only", "admin-only-2");
            file.write_all(format!("---\n{rest}").as_bytes()).unwrap();
            drop(file);
        };
        // The pod alone (the first half) is never applied.
        let watcher = always(&store, Duration::from_millis(400), |o| !has(o, Kind::Pod, "a"));
        tokio::join!(writer, watcher);
        eventually(&store, Duration::from_secs(1), |o| {
            has(o, Kind::Pod, "a") && has(o, Kind::AuthorizationPolicy, "admin-only-2")
        })
        .await;
    }
}
