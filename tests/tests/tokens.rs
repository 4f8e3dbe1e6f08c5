//! `cairn token`: tokens are shown once, stored as hashes, listed without
//! themselves, unique by name, and revoked by id or name.

use cairn_e2e::{World, assert_fails, json_stdout, text};

#[test]
fn tokens_are_shown_once_and_listed_without_themselves() {
    let w = World::new("tokens");
    let out = w.run(&["token", "create", "--role", "operator", "--name", "ci"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let token = text(&out.stdout);
    assert_eq!(token.lines().count(), 1, "exactly one line: {token:?}");
    let token = token.trim_end_matches('\n');
    assert!(!token.is_empty() && token.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'), "{token}");

    let made = json_stdout(&w.run(&["token", "create", "--role", "admin", "--json"]));
    let keys: Vec<&str> = made.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["id", "name", "role", "token"]);
    assert_eq!(made["role"], "admin");

    assert_fails(&w.run(&["token", "create", "--role", "viewer", "--name", "ci"]), 2, &["exists already"]);
    assert_fails(&w.run(&["token", "create", "--name", "x"]), 2, &["--role"]);

    let listed = w.run(&["token", "list", "--json"]);
    let listed_text = text(&listed.stdout);
    assert!(!listed_text.contains(token) && !listed_text.contains(made["token"].as_str().unwrap()), "no token shown");
    let list = json_stdout(&listed);
    assert_eq!(list.as_array().unwrap().len(), 2);
    // The database holds no token either.
    let db = w.database_bytes();
    let secret = token.rsplit('_').next().unwrap();
    assert!(!db.windows(secret.len()).any(|w| w == secret.as_bytes()), "the secret is not stored");

    assert!(w.run(&["token", "revoke", "ci"]).status.success());
    let id = made["id"].as_str().unwrap();
    assert!(w.run(&["token", "revoke", id]).status.success());
    assert_fails(&w.run(&["token", "revoke", "nobody"]), 1, &["no token"]);
    let list = json_stdout(&w.run(&["token", "list", "--json"]));
    assert!(list.as_array().unwrap().iter().all(|t| t["revoked_at"].is_string()), "{list}");
}
