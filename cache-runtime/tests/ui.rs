//! Compile-time behaviour of `#[cached]`: what it accepts, and the errors (with
//! spans) for what it doesn't. Snapshots: `TRYBUILD=overwrite cargo test --test ui`.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass/*.rs");
    t.compile_fail("tests/ui/fail/*.rs");
}
