//! End-to-end tests of `osmvec import`, `stats` and `export` on real extracts.

use osmvec_test_kit::*;

#[test]
fn liechtenstein_counts_and_pbf_xml_parity() {
    let dir = tempdir();
    let pbf_store = dir.path().join("pbf");
    let xml_store = dir.path().join("xml");
    let pbf = data("extracts/liechtenstein-2013-08-03.osm.pbf");
    let bz2 = data("extracts/liechtenstein-2013-08-03.osm.bz2");
    osmvec_ok(&["import", "--store", path_str(&pbf_store), path_str(&pbf)]);
    osmvec_ok(&["import", "--store", path_str(&xml_store), path_str(&bz2)]);
    for store in [&pbf_store, &xml_store] {
        let s = stats(store);
        assert_eq!(s["nodes"], 65_733);
        assert_eq!(s["ways"], 7_121);
        assert_eq!(s["relations"], 113);
        assert!(s["features"]["point"].as_i64().unwrap() > 0);
        assert!(s["features"]["polyline"].as_i64().unwrap() > 0);
        assert!(s["features"]["polygon"].as_i64().unwrap() > 0);
        // Every tile of a fresh import needs embedding.
        let tiles = s["tiles"].as_u64().unwrap() + s["coarse_tiles"].as_u64().unwrap();
        assert!(tiles > 100);
        assert_eq!(s["dirty_tiles"].as_u64().unwrap(), tiles);
        assert!(s["sequence"].is_null());
    }
    let a = export(&pbf_store);
    let b = export(&xml_store);
    assert_same_opl(&a, &b, "PBF vs XML import");
    assert_eq!(stats(&pbf_store)["features"], stats(&xml_store)["features"]);
}

#[test]
fn export_equals_osmium_on_real_extracts() {
    for f in [
        "extracts/liechtenstein-2013-08-03.osm.pbf",
        "extracts/monaco-2015-04-27.osm.pbf",
        "extracts/helsinki-centre-2019-04-21.osm.pbf",
    ] {
        let dir = tempdir();
        let store = dir.path().join("s");
        let file = data(f);
        osmvec_ok(&["import", "--store", path_str(&store), path_str(&file)]);
        assert_same_opl(&sort_tags(&export(&store)), &osmium_opl(&file), f);
    }
}

#[test]
fn multipolygons_become_polygons() {
    for (f, min_assembled) in [
        ("extracts/liechtenstein-2013-08-03.osm.pbf", 5),
        ("extracts/monaco-2015-04-27.osm.pbf", 5),
    ] {
        let dir = tempdir();
        let store = dir.path().join("s");
        let out = osmvec_ok(&[
            "import",
            "--json",
            "--store",
            path_str(&store),
            path_str(&data(f)),
        ]);
        let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
        let assembled = summary["counts"]["multipolygons_assembled"]
            .as_i64()
            .unwrap();
        let failed = summary["counts"]["multipolygons_failed"].as_i64().unwrap();
        eprintln!("{f}: {assembled} multipolygons assembled, {failed} failed");
        assert!(
            assembled >= min_assembled,
            "{f}: only {assembled} assembled"
        );
        let s = stats(&store);
        assert_eq!(s["multipolygons"]["assembled"], assembled);
        assert_eq!(s["multipolygons"]["failed"], failed);
        // Independent check: relations tagged type=multipolygon or boundary
        // with more than the type tag, counted by osmium.
        let opl = osmium(&["cat", "-f", "opl", "-t", "relation", path_str(&data(f))]);
        let candidates = opl
            .lines()
            .filter(|l| {
                let tags = l.split(' ').find(|t| t.starts_with('T')).unwrap_or("T");
                let tags: Vec<&str> = tags[1..].split(',').collect();
                (tags.contains(&"type=multipolygon") || tags.contains(&"type=boundary"))
                    && tags
                        .iter()
                        .any(|t| !t.starts_with("type=") && !t.is_empty())
            })
            .count() as i64;
        assert!(
            assembled + failed <= candidates && assembled + failed >= candidates * 9 / 10,
            "{f}: {assembled} + {failed} vs {candidates} candidate relations"
        );
    }
}

#[test]
fn merging_two_extracts_keeps_the_highest_version() {
    // Monaco 2015 and 2026 overlap: the merged store holds every object of
    // both, with the 2026 version where both have one.
    let dir = tempdir();
    let store = dir.path().join("s");
    let old = data("extracts/monaco-2015-04-27.osm.pbf");
    let new = data("extracts/monaco-2026-03-10.osm.pbf");
    osmvec_ok(&["import", "--store", path_str(&store), path_str(&old)]);
    osmvec_ok(&["import", "--store", path_str(&store), path_str(&new)]);
    let merged = export(&store);
    let mut latest = std::collections::BTreeMap::new();
    for f in [&old, &new] {
        for line in osmium(&["cat", "-f", "opl,add_metadata=version", path_str(f)]).lines() {
            let mut it = line.split(' ');
            let id = it.next().unwrap().to_string();
            let v: u32 = it.next().unwrap()[1..].parse().unwrap();
            let e = latest.entry(id).or_insert((0u32, String::new()));
            if v >= e.0 {
                *e = (v, line.to_string());
            }
        }
    }
    let expected: String = {
        // osmium order: nodes, ways, relations, ascending id.
        let mut lines: Vec<(u8, i64, String)> = latest
            .into_iter()
            .map(|(id, (_, l))| {
                let t = match &id[..1] {
                    "n" => 0,
                    "w" => 1,
                    _ => 2,
                };
                (t, id[1..].parse().unwrap(), l)
            })
            .collect();
        lines.sort();
        lines.into_iter().map(|(_, _, l)| l + "\n").collect()
    };
    assert_same_opl(&sort_tags(&merged), &sort_tags(&expected), "merged import");
}

#[test]
fn bad_input_names_the_file_and_leaves_the_store_alone() {
    let dir = tempdir();
    let store = dir.path().join("s");
    let good = data("extracts/monaco-2015-04-27.osm.pbf");
    osmvec_ok(&["import", "--store", path_str(&store), path_str(&good)]);
    let before_stats = stats(&store);
    let before = export(&store);

    let bytes = std::fs::read(data("extracts/liechtenstein-2013-08-03.osm.pbf")).unwrap();
    let truncated = dir.path().join("truncated.osm.pbf");
    std::fs::write(&truncated, &bytes[..bytes.len() * 2 / 3]).unwrap();

    let xml = dir.path().join("malformed.osm");
    std::fs::write(
        &xml,
        "<?xml version='1.0' encoding='UTF-8'?>\n<osm version=\"0.6\">\n  <node id=\"1\" version=\"1\" lat=\"43.7\" lon=\"7.4\">\n    <tag k=\"a\" v=\"b\"/>\n  </nodx>\n</osm>\n",
    )
    .unwrap();
    let missing = dir.path().join("missing.osm.pbf");

    for bad in [&truncated, &xml, &missing] {
        let out = osmvec(&["import", "--store", path_str(&store), path_str(bad)]);
        assert!(!out.status.success(), "{} was accepted", bad.display());
        let err = String::from_utf8_lossy(&out.stderr);
        let name = bad.file_name().unwrap().to_str().unwrap();
        assert!(err.contains(name), "error does not name {name}: {err}");
        if bad == &xml {
            assert!(
                err.contains("line 5"),
                "error does not give the line: {err}"
            );
        }
        assert_eq!(stats(&store), before_stats);
        assert_eq!(export(&store), before, "store changed by {}", bad.display());
    }

    // A failed import into a new store leaves no half-built store behind.
    let fresh = dir.path().join("fresh");
    let out = osmvec(&["import", "--store", path_str(&fresh), path_str(&truncated)]);
    assert!(!out.status.success());
    assert!(!fresh.exists(), "a failed import left a store behind");
}

#[test]
fn replication_header_is_recorded() {
    let dir = tempdir();
    let store = dir.path().join("s");
    let base = data("replication/maldives/base-2017-03-01T0749Z.osm.pbf");
    osmvec_ok(&["import", "--store", path_str(&store), path_str(&base)]);
    let s = stats(&store);
    assert_eq!(s["sequence"], 0);
    assert_eq!(s["timestamp"], "2017-03-01T07:49:00Z");
}
