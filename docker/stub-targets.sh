#!/bin/sh
# stub-targets.sh MANIFEST...
#
# For docker/Dockerfile's dependency-cache layer: creates a placeholder
# source file for every target each Cargo manifest declares ([lib], [[bin]],
# [[test]], [[example]], [[bench]]: at its `path`, or where cargo looks by
# default), so cargo accepts the manifests and `cargo build` compiles every
# dependency before the real sources are copied in. A manifest that declares
# neither [lib] nor [[bin]] (a library member such as crates/servers) gets
# src/lib.rs. Existing files are left alone.
#
# It reads the manifests with awk (no TOML parser in the build image), so it
# understands only what agentq's manifests use: section headers on their own
# line and `name = "..."` / `path = "..."` on one line each.
set -eu

for manifest in "$@"; do
    dir=$(dirname "$manifest")
    awk '
        function flush() {
            if (kind == "") return
            if (path == "") {
                if (kind == "lib") path = "src/lib.rs"
                else if (kind == "bin") path = "src/bin/" name ".rs"
                else if (kind == "test") path = "tests/" name ".rs"
                else if (kind == "example") path = "examples/" name ".rs"
                else if (kind == "bench") path = "benches/" name ".rs"
            }
            print kind, path
            if (kind == "lib" || kind == "bin") code = 1
            kind = ""; name = ""; path = ""
        }
        /^[ \t]*\[/ {
            flush()
            if ($0 ~ /^[ \t]*\[lib\]/) kind = "lib"
            else if (match($0, /^[ \t]*\[\[(bin|test|example|bench)\]\]/)) {
                kind = $0
                sub(/^[ \t]*\[\[/, "", kind); sub(/\]\].*/, "", kind)
            }
            next
        }
        kind != "" && /^[ \t]*(name|path)[ \t]*=/ {
            value = $0
            sub(/^[^=]*=[ \t]*"/, "", value); sub(/".*/, "", value)
            if ($0 ~ /^[ \t]*name/) name = value; else path = value
        }
        END { flush(); if (!code) print "lib", "src/lib.rs" }
    ' "$manifest" | while read -r kind path; do
        file="$dir/$path"
        [ -e "$file" ] && continue
        mkdir -p "$(dirname "$file")"
        if [ "$kind" = lib ]; then
            echo "// placeholder for the dependency-cache layer" >"$file"
        else
            echo "fn main() {}" >"$file"
        fi
    done
done
