//! Reader tests on the real files of the shared data set (see its
//! SOURCES.md for where each file and each expected count comes from).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;
use crate::element::{Action, ElementType};
use crate::opl;

/// A test data file: from the repository's `tests/data` once copied there,
/// else from the shared data set next to the workspace.
fn data(rel: &str) -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let in_repo = manifest.join("../tests/data").join(rel);
    if in_repo.exists() {
        return in_repo;
    }
    let shared = manifest.join("../../shared/data").join(rel);
    assert!(
        shared.exists(),
        "test data file {rel} not found at {shared:?}"
    );
    shared
}

fn read_all(path: &Path) -> (FileHeader, Vec<Element>) {
    let mut all = Vec::new();
    let header = read_extract(path, &mut |batch| {
        all.extend(batch);
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    (header, all)
}

fn counts(elements: &[Element]) -> [usize; 3] {
    let mut c = [0; 3];
    for e in elements {
        c[e.kind() as usize] += 1;
    }
    c
}

fn ts(text: &str) -> i64 {
    values::parse_timestamp(text).unwrap()
}

fn osc_str(text: &str) -> Result<Vec<Change>, ReadError> {
    let mut changes = Vec::new();
    read_osc(
        "test.osc",
        text.as_bytes(),
        false,
        &OscOptions::default(),
        &mut |c| {
            changes.push(c);
            Ok(())
        },
    )?;
    Ok(changes)
}

fn osc_err(text: &str) -> String {
    match osc_str(text) {
        Ok(changes) => panic!("expected an error, got {} changes", changes.len()),
        Err(e) => e.to_string(),
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// A copy of `src` cut to `len` bytes, in a temporary file with the same
/// extension.
fn truncated_copy(src: &Path, len: usize, tag: &str) -> PathBuf {
    let bytes = std::fs::read(src).unwrap();
    let name = src.file_name().unwrap().to_string_lossy();
    let dir = std::env::temp_dir().join(format!("osmvec-read-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{tag}-{name}"));
    std::fs::write(&path, &bytes[..len]).unwrap();
    path
}

#[test]
fn liechtenstein_pbf_and_xml_are_identical() {
    let (pbf_header, pbf) = read_all(&data("extracts/liechtenstein-2013-08-03.osm.pbf"));
    let (xml_header, xml) = read_all(&data("extracts/liechtenstein-2013-08-03.osm.bz2"));
    assert_eq!(counts(&pbf), [65_733, 7_121, 113]);
    assert_eq!(counts(&xml), [65_733, 7_121, 113]);
    assert_eq!(pbf.len(), xml.len());
    for (a, b) in pbf.iter().zip(&xml) {
        assert_eq!(a, b);
    }
    let expected = Some(ts("2013-08-03T19:00:02Z"));
    assert_eq!(pbf_header.replication_timestamp, expected);
    assert_eq!(xml_header.replication_timestamp, expected);
    assert_eq!(pbf_header, xml_header);
    assert_eq!(
        read_header(&data("extracts/liechtenstein-2013-08-03.osm.bz2")).unwrap(),
        xml_header
    );
}

#[test]
fn headers() {
    let base = read_header(&data("replication/maldives/base-2017-03-01T0749Z.osm.pbf")).unwrap();
    assert_eq!(base.replication_timestamp, Some(ts("2017-03-01T07:49:00Z")));
    assert_eq!(base.replication_sequence, Some(0));
    assert_eq!(base.replication_base_url, None);

    let monaco = read_header(&data("extracts/monaco-2026-03-10.osm.pbf")).unwrap();
    assert_eq!(
        monaco,
        FileHeader {
            replication_timestamp: Some(ts("2026-03-10T21:21:21Z")),
            replication_sequence: Some(4720),
            replication_base_url: Some(
                "https://download.geofabrik.de/europe/monaco-updates".to_owned()
            ),
        }
    );
    let helsinki = read_header(&data("extracts/helsinki-centre-2019-04-21.osm.pbf")).unwrap();
    assert_eq!(helsinki, FileHeader::default());
}

#[test]
fn history_pbf_yields_visible_versions() {
    let path = data("history/maldives-history-2017-08-05.osh.pbf");
    let (_, all) = read_all(&path);
    // 238,939 / 35,585 / 1,339 versions in all, some of them deletions.
    let [n, w, r] = counts(&all);
    assert!(n > 200_000 && n < 238_939, "{n}");
    assert!(w > 30_000 && w < 35_585, "{w}");
    assert!(r > 1_000 && r <= 1_339, "{r}");
    let Some(theirs) = osmium(&[
        "cat",
        "-f",
        "opl,add_metadata=version",
        &path.to_string_lossy(),
    ]) else {
        return;
    };
    let visible: String = theirs
        .lines()
        .filter(|l| !l.contains(" dD "))
        .flat_map(|l| [l, "\n"])
        .collect();
    assert_same_lines(&opl_of(&all), &visible, "history");
}

/// Writes `text` to a temporary file named `name` (gzip-compressed if the
/// name ends in `.gz`).
fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("osmvec-read-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let bytes = if name.ends_with(".gz") {
        gzip(text.as_bytes())
    } else {
        text.as_bytes().to_vec()
    };
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn osm_xml_details() {
    let text = r#"<?xml version='1.0' encoding='UTF-8'?>
<osm version="0.6" generator="test" osmosis_replication_timestamp="2020-01-02T03:04:05Z"
     osmosis_replication_sequence_number="17" osmosis_replication_base_url="https://example.org/x">
  <bounds minlat="1" minlon="1" maxlat="2" maxlon="2"/>
  <note>extension elements are skipped <b>with</b> their content</note>
  <node id="1" version="2" lat="1.5" lon="2.5"/>
  <node id="2" version="3" visible="false"/>
  <node id="3" lat="0" lon="0"><tag k="a" v="b"/></node>
  <way id="4" version="1"><nd ref="1"/><nd ref="3"/></way>
</osm>
"#;
    let path = temp_file("details.osm.gz", text);
    let (header, elements) = read_all(&path);
    assert_eq!(
        header,
        FileHeader {
            replication_timestamp: Some(ts("2020-01-02T03:04:05Z")),
            replication_sequence: Some(17),
            replication_base_url: Some("https://example.org/x".to_owned()),
        }
    );
    assert_eq!(read_header(&path).unwrap(), header);
    // The deleted node 2 is left out; a missing version is 0.
    assert_eq!(
        elements.iter().map(Element::id).collect::<Vec<_>>(),
        [1, 3, 4]
    );
    assert_eq!(elements[1].meta().version, 0);

    let err = |name: &str, text: &str| {
        read_extract(&temp_file(name, text), &mut |_| Ok(()))
            .unwrap_err()
            .to_string()
    };
    let truncated = &text[..text.find("<way").unwrap()];
    let message = err("truncated.osm", truncated);
    assert!(
        message.contains("truncated.osm, line 9, column 3"),
        "{message}"
    );
    assert!(message.contains("ends before"), "{message}");
    let message = err("nolat.osm", "<osm>\n\n<node id=\"9\" version=\"1\"/></osm>");
    assert!(
        message.contains("line 3, column 1: node 9: bad coordinates"),
        "{message}"
    );
    let message = err("root.osm", "<osmChange/>");
    assert!(message.contains("expected <osm>"), "{message}");
}

#[test]
fn extract_format_comes_from_the_name() {
    let err = read_header(&data("diffs/planet-minute/2016-07-02T2135.osc")).unwrap_err();
    assert!(matches!(err, ReadError::UnsupportedFormat { .. }), "{err}");
    assert!(err.to_string().contains("2016-07-02T2135.osc"), "{err}");
    let err = read_header(Path::new("/nonexistent/file.txt")).unwrap_err();
    assert!(matches!(err, ReadError::UnsupportedFormat { .. }), "{err}");
    let err = read_header(Path::new("/nonexistent/file.osm.pbf")).unwrap_err();
    assert!(matches!(err, ReadError::Io { .. }), "{err}");
    assert!(
        err.to_string().contains("/nonexistent/file.osm.pbf"),
        "{err}"
    );
}

/// Changes counted per action and type: `[action][type]`.
type ChangeCounts = [[usize; 3]; 3];

fn count_changes(path: &Path) -> ChangeCounts {
    let mut c = [[0; 3]; 3];
    read_osc_file(path, &OscOptions::default(), &mut |change| {
        let action = match change.action {
            Action::Create => 0,
            Action::Modify => 1,
            Action::Delete => 2,
        };
        c[action][change.element.kind() as usize] += 1;
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    c
}

#[test]
fn every_real_diff_parses_with_the_documented_counts() {
    // From SOURCES.md: create, modify, delete; each nodes / ways / relations.
    let expected: &[(&str, ChangeCounts)] = &[
        (
            "diffs/planet-minute/000466354.osc.gz",
            [[719, 729, 13], [135, 40, 6], [12, 1, 0]],
        ),
        (
            "diffs/planet-minute/004230996.osc.gz",
            [[3239, 509, 0], [1432, 276, 5], [2132, 335, 1]],
        ),
        (
            "diffs/planet-minute/2016-07-02T2135.osc",
            [[305, 31, 0], [192, 93, 0], [20, 0, 0]],
        ),
        (
            "diffs/planet-minute/2016-07-19T0547.osc",
            [[147, 27, 0], [3, 16, 0], [1, 0, 0]],
        ),
        (
            "diffs/planet-minute/2016-12-02T1416.osc.gz",
            [[514, 54, 0], [79, 35, 1], [1673, 208, 0]],
        ),
        (
            "diffs/geofabrik/central-america-3064.osc.gz",
            [[27607, 6099, 23], [1133, 589, 6], [402, 76, 2]],
        ),
        (
            "diffs/derived/andorra-2017-02-19_2018-03-01.osc.gz",
            [[13907, 1251, 32], [6781, 903, 85], [7896, 67, 28]],
        ),
        (
            "diffs/derived/andorra-2018-03-01_2019-02-23.osc.gz",
            [[8237, 1220, 11], [4065, 664, 58], [494, 18, 3]],
        ),
        (
            "diffs/derived/andorra-2019-02-23_2021-04-14.osc.gz",
            [[35797, 2107, 24], [7839, 2451, 130], [1768, 80, 8]],
        ),
        (
            "diffs/derived/monaco-2015-04-27_2015-07-07.osc.gz",
            [[251, 37, 1], [143, 44, 22], [34, 2, 0]],
        ),
        (
            "diffs/derived/monaco-2015-07-07_2016-01-01.osc.gz",
            [[395, 27, 0], [337, 284, 30], [109, 8, 2]],
        ),
        (
            "diffs/derived/monaco-2016-01-01_2021-04-21.osc.gz",
            [[8181, 1224, 44], [5366, 2425, 183], [2062, 212, 9]],
        ),
        (
            "diffs/derived/monaco-2021-04-21_2022-07-19.osc.gz",
            [[2363, 206, 9], [2033, 1230, 127], [761, 57, 9]],
        ),
        (
            "diffs/derived/monaco-2022-07-19_2023-11-21.osc.gz",
            [[4020, 522, 18], [3098, 1369, 127], [912, 91, 11]],
        ),
        (
            "diffs/derived/monaco-2023-11-21_2026-03-10.osc.gz",
            [[9652, 995, 39], [4566, 2009, 191], [902, 136, 9]],
        ),
        (
            "diffs/derived/liechtenstein-2013-08-03_2022-07-24.osc.gz",
            [
                [229_669, 14_498, 206],
                [48_746, 17_432, 681],
                [13_587, 1_579, 26],
            ],
        ),
    ];
    let total = |c: &ChangeCounts| c.iter().flatten().sum::<usize>();
    for (rel, want) in expected {
        let got = count_changes(&data(rel));
        assert_eq!(&got, want, "{rel}");
    }
    assert_eq!(
        total(&count_changes(&data(
            "diffs/planet-minute/000466354.osc.gz"
        ))),
        1_655
    );
    assert_eq!(total(&expected[15].1), 326_424);

    // Every file of the diff directories: nothing left out above.
    for dir in ["diffs/planet-minute", "diffs/geofabrik", "diffs/derived"] {
        for entry in std::fs::read_dir(data(dir)).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.contains(".osc") {
                assert!(
                    expected.iter().any(|(rel, _)| rel.ends_with(&name)),
                    "{name} has no expected counts"
                );
            }
        }
    }
}

/// Sums the changes of the `n` diffs of a replication directory.
fn replica_counts(dir: &str, n: usize) -> (ChangeCounts, usize) {
    let mut sum = [[0; 3]; 3];
    let mut non_empty = 0;
    for seq in 1..=n {
        let c = count_changes(&data(&format!("{dir}/000/000/{seq:03}.osc.gz")));
        if c.iter().flatten().any(|&x| x > 0) {
            non_empty += 1;
        }
        for (s, c) in sum.iter_mut().flatten().zip(c.iter().flatten()) {
            *s += c;
        }
    }
    (sum, non_empty)
}

#[test]
fn replication_diffs_parse_with_the_documented_counts() {
    let (maldives, non_empty) = replica_counts("replication/maldives/minute", 180);
    assert_eq!(maldives, [[6465, 116, 0], [1, 1057, 0], [109, 1, 0]]);
    assert_eq!(non_empty, 95);
    let (andorra, _) = replica_counts("replication/andorra/day", 35);
    assert_eq!(andorra, [[1061, 173, 1], [196, 40, 58], [2, 0, 0]]);
}

#[test]
fn osc_content_details() {
    let changes = osc_str(
        r#"<?xml version='1.0' encoding='UTF-8'?>
<osmChange version="0.6" generator="test">
  <create>
    <node id="1" version="1" timestamp="2017-03-01T07:49:01Z" lat="-12.3456789" lon="179.9999999">
      <tag k="name" v="A &amp; B &lt;&quot;&#233;&#10;"/>
    </node>
    <way id="2" version="1"><nd ref="1"/><nd ref="-5"/><tag k="x" v=""></tag></way>
  </create>
  <modify/>
  <delete>
    <node id="3" version="4"/>
    <node id="4" version="5" visible="false" lat="1.5" lon="2"><tag k="t" v="u"/></node>
    <relation id="5" version="2">
      <member type="way" ref="2" role="outer"/>
      <member type="relation" ref="7"/>
    </relation>
  </delete>
  <modify><node id="1" version="2" lat="0" lon="0"/></modify>
</osmChange>
"#,
    )
    .unwrap();
    assert_eq!(changes.len(), 6);
    let Element::Node(n) = &changes[0].element else {
        panic!()
    };
    assert_eq!(changes[0].action, Action::Create);
    assert_eq!(
        (n.id, n.meta.version, n.meta.timestamp),
        (1, 1, ts("2017-03-01T07:49:01Z"))
    );
    assert_eq!((n.lat, n.lon), (-123_456_789, 1_799_999_999));
    assert_eq!(n.tags, vec![("name".to_owned(), "A & B <\"é\n".to_owned())]);
    let Element::Way(w) = &changes[1].element else {
        panic!()
    };
    assert_eq!(w.refs, vec![1, -5]);
    assert_eq!(w.tags, vec![("x".to_owned(), String::new())]);
    let Element::Node(n) = &changes[2].element else {
        panic!()
    };
    assert_eq!(changes[2].action, Action::Delete);
    assert_eq!((n.lat, n.lon), (UNDEFINED_COORD, UNDEFINED_COORD));
    let Element::Node(n) = &changes[3].element else {
        panic!()
    };
    assert_eq!((n.lat, n.lon, n.tags.len()), (15_000_000, 20_000_000, 1));
    let Element::Relation(r) = &changes[4].element else {
        panic!()
    };
    assert_eq!(r.members.len(), 2);
    assert_eq!(r.members[0].kind, ElementType::Way);
    assert_eq!(r.members[1].role, "");
    assert_eq!(changes[5].action, Action::Modify);
    assert_eq!(changes[5].element.meta().version, 2);

    assert!(osc_str("<osmChange/>").unwrap().is_empty());
    assert!(
        osc_str("<?xml version='1.0'?>\n<osmChange version=\"0.6\"/>\n")
            .unwrap()
            .is_empty()
    );
}

#[test]
fn osc_errors_name_element_and_position() {
    let bad_lat = osc_err(
        "<osmChange>\n<create>\n  <node id=\"42\" version=\"1\" lat=\"91.0\" lon=\"1\"/>\n</create>\n</osmChange>",
    );
    assert!(bad_lat.contains("test.osc"), "{bad_lat}");
    assert!(bad_lat.contains("node 42"), "{bad_lat}");
    assert!(bad_lat.contains("line 3, column 3"), "{bad_lat}");
    assert!(bad_lat.contains("lat"), "{bad_lat}");

    let cases: &[(&str, &str)] = &[
        (
            "<osmChange><create><node id=\"1\" version=\"1\" lat=\"x\" lon=\"1\"/></create></osmChange>",
            "node 1",
        ),
        (
            "<osmChange><create><node id=\"1\" version=\"1\" lat=\"1\" lon=\"180.0000001\"/></create></osmChange>",
            "outside",
        ),
        (
            "<osmChange><create><node id=\"1\" version=\"1\"/></create></osmChange>",
            "without lat/lon",
        ),
        (
            "<osmChange><modify><node id=\"1\" version=\"1\" lat=\"1\"/></modify></osmChange>",
            "lat without lon",
        ),
        (
            "<osmChange><delete><node id=\"1\" version=\"1\" lat=\"1\" lon=\"x\"/></delete></osmChange>",
            "lon",
        ),
        (
            "<osmChange><create><node version=\"1\" lat=\"1\" lon=\"1\"/></create></osmChange>",
            "missing attribute `id`",
        ),
        (
            "<osmChange><create><node id=\"1x\" version=\"1\" lat=\"1\" lon=\"1\"/></create></osmChange>",
            "invalid `id`",
        ),
        (
            "<osmChange><delete><way id=\"7\"/></delete></osmChange>",
            "way 7: missing attribute `version`",
        ),
        (
            "<osmChange><delete><way id=\"7\" version=\"-1\"/></delete></osmChange>",
            "way 7: invalid `version`",
        ),
        (
            "<osmChange><delete><way id=\"7\" version=\"1\" timestamp=\"now\"/></delete></osmChange>",
            "invalid `timestamp`",
        ),
        (
            "<osmChange><create><way id=\"7\" version=\"1\"><nd ref=\"a\"/></way></create></osmChange>",
            "<nd> of way 7",
        ),
        (
            "<osmChange><create><way id=\"7\" version=\"1\"><nd/></way></create></osmChange>",
            "missing attribute `ref`",
        ),
        (
            "<osmChange><create><way id=\"7\" version=\"1\"><member type=\"node\" ref=\"1\"/></way></create></osmChange>",
            "unexpected child",
        ),
        (
            "<osmChange><create><relation id=\"8\" version=\"1\"><member type=\"area\" ref=\"1\"/></relation></create></osmChange>",
            "must be node, way or relation",
        ),
        (
            "<osmChange><create><node id=\"1\" version=\"1\" lat=\"1\" lon=\"1\"><tag k=\"a\"/></node></create></osmChange>",
            "missing attribute `v`",
        ),
        (
            "<osmChange><upsert><node id=\"1\" version=\"1\" lat=\"1\" lon=\"1\"/></upsert></osmChange>",
            "unknown osmChange action <upsert>",
        ),
        (
            "<osmChange><node id=\"1\" version=\"1\" lat=\"1\" lon=\"1\"/></osmChange>",
            "outside <create>",
        ),
        (
            "<osmChange><create><bounds/></create></osmChange>",
            "unexpected <bounds> inside <create>",
        ),
        (
            "<osm><node id=\"1\" version=\"1\" lat=\"1\" lon=\"1\"/></osm>",
            "expected <osmChange>",
        ),
        ("", "no <osmChange>"),
        ("<osmChange><create>", "ends before"),
        ("<osmChange><create></modify></osmChange>", "line 1"),
        (
            "<osmChange></osmChange><osmChange/>",
            "after the end of the root",
        ),
        ("<osmChange>text</osmChange>", "unexpected text"),
        (
            "<osmChange><create><node id=\"1\" id=\"2\" version=\"1\" lat=\"1\" lon=\"1\"/></create></osmChange>",
            "line 1",
        ),
        (
            "<osmChange><create><node id=\"1\" version=\"1\" lat=\"1\" lon=\"1\"><tag k=\"a\" v=\"&bogus;\"/></node></create></osmChange>",
            "line 1",
        ),
    ];
    for (text, expect) in cases {
        let err = osc_err(text);
        assert!(
            err.contains(expect),
            "{text}\n  gave: {err}\n  expected to contain: {expect}"
        );
        assert!(err.starts_with("test.osc"), "{err}");
    }
    let err = osc_str("<osmChange><upsert/></osmChange>").unwrap_err();
    assert!(
        matches!(err, ReadError::UnknownAction { ref action, .. } if action == "upsert"),
        "{err}"
    );
}

#[test]
fn malformed_xml_reports_the_line() {
    let text = std::fs::read_to_string(data("diffs/planet-minute/2016-07-19T0547.osc")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() > 300);

    // Garbage in the middle.
    let mut broken = lines.clone();
    broken.insert(200, "  <node id=\"1\" <<garbage");
    let err = osc_err(&broken.join("\n"));
    assert!(err.contains("line 201"), "{err}");

    // An unclosed element in the middle: the mismatch shows up at the
    // parent's end tag, which is still reported with its line.
    let mut broken = lines.clone();
    broken.insert(200, "  <node id=\"1\" version=\"1\" lat=\"1\" lon=\"1\">");
    let err = osc_err(&broken.join("\n"));
    assert!(err.contains("line "), "{err}");

    // Cut in the middle of a line and of the document.
    let cut = &text[..text.len() / 2];
    let err = osc_err(cut);
    let line = cut.lines().count();
    assert!(
        err.contains(&format!("line {line}")) || err.contains("ends before"),
        "{err}"
    );
}

#[test]
fn truncated_and_corrupt_gzip_is_an_error() {
    let src = data("diffs/planet-minute/000466354.osc.gz");
    let len = std::fs::metadata(&src).unwrap().len() as usize;
    // Cut mid-stream, inside the 8-byte trailer, and just before it.
    for cut in [len / 2, len - 1, len - 4, len - 8] {
        let path = truncated_copy(&src, cut, &format!("cut{cut}"));
        let mut n = 0;
        let err = read_osc_file(&path, &OscOptions::default(), &mut |_| {
            n += 1;
            Ok(())
        })
        .expect_err("truncated gzip must fail");
        assert!(
            matches!(
                err,
                ReadError::Compression {
                    codec: Codec::Gzip,
                    ..
                }
            ),
            "cut {cut}: {err}"
        );
        assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
    }
    // A flipped byte in the deflate data.
    let mut bytes = std::fs::read(&src).unwrap();
    bytes[len / 3] ^= 0x55;
    let err = read_osc(
        "corrupt",
        bytes.as_slice(),
        true,
        &OscOptions::default(),
        &mut |_| Ok(()),
    )
    .expect_err("corrupt gzip must fail");
    assert!(err.to_string().starts_with("corrupt"), "{err}");
}

#[test]
fn truncated_bzip2_extract_is_an_error() {
    let src = data("extracts/liechtenstein-2013-08-03.osm.bz2");
    let len = std::fs::metadata(&src).unwrap().len() as usize;
    let path = truncated_copy(&src, len - 100, "cut");
    let err = read_extract(&path, &mut |_| Ok(())).expect_err("truncated bzip2 must fail");
    assert!(
        matches!(
            err,
            ReadError::Compression {
                codec: Codec::Bzip2,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn gzip_bomb_hits_the_cap() {
    let mut text = String::from("<osmChange><modify>");
    text.push_str(&" ".repeat(20 << 20));
    text.push_str("</modify></osmChange>");
    let bomb = gzip(text.as_bytes());
    assert!(bomb.len() < 100_000);
    let opts = OscOptions {
        max_decompressed_bytes: 1 << 20,
        ..OscOptions::default()
    };
    let err = read_osc("bomb", bomb.as_slice(), true, &opts, &mut |_| Ok(())).unwrap_err();
    assert!(
        matches!(err, ReadError::TooLarge { limit, .. } if limit == 1 << 20),
        "{err}"
    );
    // Within the cap the same data reads fine.
    read_osc(
        "bomb",
        bomb.as_slice(),
        true,
        &OscOptions::default(),
        &mut |_| Ok(()),
    )
    .unwrap();
}

#[test]
fn truncated_pbf_is_an_error_naming_the_file() {
    let src = data("extracts/monaco-2015-04-27.osm.pbf");
    let len = std::fs::metadata(&src).unwrap().len() as usize;
    // The first blob's length prefix and header size, to cut right after it.
    let bytes = std::fs::read(&src).unwrap();
    let header_len = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
    for cut in [len / 2, len - 1, 2, 4 + header_len / 2] {
        let path = truncated_copy(&src, cut, &format!("cut{cut}"));
        let mut delivered = 0;
        let err = read_extract(&path, &mut |batch| {
            delivered += batch.len();
            Ok(())
        })
        .expect_err("truncated PBF must fail");
        let message = err.to_string();
        assert!(message.contains(&*path.to_string_lossy()), "{message}");
        assert!(matches!(err, ReadError::Pbf { .. }), "{message}");
        assert!(message.contains("truncated"), "{message}");
    }
}

#[test]
fn consumer_errors_stop_reading() {
    let mut calls = 0;
    let err = read_extract(&data("extracts/monaco-2015-04-27.osm.pbf"), &mut |_| {
        calls += 1;
        Err(ReadError::consumer("store is full"))
    })
    .unwrap_err();
    assert_eq!(calls, 1);
    assert_eq!(err.to_string(), "consumer failed: store is full");
}

/// Runs osmium, or returns `None` (and says so) where it is not installed.
fn osmium(args: &[&str]) -> Option<String> {
    match Command::new("osmium").args(args).output() {
        Ok(out) if out.status.success() => Some(String::from_utf8(out.stdout).unwrap()),
        Ok(out) => panic!(
            "osmium {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => {
            eprintln!("SKIPPED: osmium is not installed ({e}); cannot compare OPL output");
            None
        }
    }
}

fn assert_same_lines(ours: &str, theirs: &str, what: &str) {
    let mut n = 0;
    for (i, (a, b)) in ours.lines().zip(theirs.lines()).enumerate() {
        assert_eq!(a, b, "{what}: line {} differs", i + 1);
        n += 1;
    }
    assert_eq!(
        ours.lines().count(),
        theirs.lines().count(),
        "{what}: line count"
    );
    assert!(n > 0, "{what}: no output");
}

fn opl_of(elements: &[Element]) -> String {
    let mut out = Vec::new();
    for e in elements {
        opl::write_element(&mut out, e).unwrap();
    }
    String::from_utf8(out).unwrap()
}

#[test]
fn opl_matches_osmium_for_extracts() {
    for rel in [
        "extracts/monaco-2015-04-27.osm.pbf",
        "extracts/helsinki-centre-2019-04-21.osm.pbf",
        "extracts/andorra-2018-03-01.osm.bz2",
    ] {
        let path = data(rel);
        let Some(theirs) = osmium(&[
            "cat",
            "-f",
            "opl,add_metadata=version",
            &path.to_string_lossy(),
        ]) else {
            return;
        };
        let (_, elements) = read_all(&path);
        assert_same_lines(&opl_of(&elements), &theirs, rel);
    }
}

#[test]
fn osc_objects_match_osmium() {
    for rel in [
        "diffs/derived/liechtenstein-2013-08-03_2022-07-24.osc.gz",
        "diffs/planet-minute/004230996.osc.gz",
        "diffs/planet-minute/2016-07-02T2135.osc",
        "diffs/geofabrik/central-america-3064.osc.gz",
    ] {
        let path = data(rel);
        let Some(theirs) = osmium(&[
            "cat",
            "-f",
            "opl,add_metadata=version",
            &path.to_string_lossy(),
        ]) else {
            return;
        };
        let mut ours = Vec::new();
        read_osc_file(&path, &OscOptions::default(), &mut |change| {
            let mut line = Vec::new();
            opl::write_element(&mut line, &change.element).unwrap();
            let mut line = String::from_utf8(line).unwrap();
            // osmium marks deleted objects `dD`; our elements carry no flag.
            if change.action == Action::Delete {
                line = line.replacen(" dV ", " dD ", 1);
            }
            ours.push(line);
            Ok(())
        })
        .unwrap();
        assert_same_lines(&ours.concat(), &theirs, rel);
    }
}

#[test]
fn pbf_batches_come_in_file_order() {
    // Two reads give the same sequence, and ids ascend within each type as
    // in the sorted file.
    let path = data("extracts/malta-2016-11-09.osm.pbf");
    let (_, a) = read_all(&path);
    let (_, b) = read_all(&path);
    assert!(a == b);
    assert_eq!(counts(&a), [252_937, 40_028, 527]);
    let mut last: BTreeMap<ElementType, i64> = BTreeMap::new();
    let mut kind_order = Vec::new();
    for e in &a {
        if kind_order.last() != Some(&e.kind()) {
            kind_order.push(e.kind());
        }
        let prev = last.insert(e.kind(), e.id());
        assert!(prev.is_none_or(|p| p < e.id()));
    }
    assert_eq!(
        kind_order,
        [ElementType::Node, ElementType::Way, ElementType::Relation]
    );
}

/// Not a check: prints read speeds (`cargo test --release -p
/// osmvec-graphstore -- --ignored --nocapture read_speed`).
#[test]
#[ignore]
fn read_speed() {
    let report = |what: &str, n: usize, start: std::time::Instant| {
        let secs = start.elapsed().as_secs_f64();
        eprintln!("{what}: {n} in {secs:.3} s, {:.0}/s", n as f64 / secs);
    };
    for rel in [
        "extracts/malta-2016-11-09.osm.pbf",
        "extracts/malta-2016-11-09.osm.pbf",
        "extracts/malta-2016-11-09.osm.pbf",
        "extracts/andorra-2018-03-01.osm.bz2",
    ] {
        let start = std::time::Instant::now();
        let mut n = 0usize;
        read_extract(&data(rel), &mut |batch| {
            n += batch.len();
            Ok(())
        })
        .unwrap();
        report(rel, n, start);
    }
    let rel = "diffs/derived/liechtenstein-2013-08-03_2022-07-24.osc.gz";
    let start = std::time::Instant::now();
    let mut n = 0usize;
    read_osc_file(&data(rel), &OscOptions::default(), &mut |_| {
        n += 1;
        Ok(())
    })
    .unwrap();
    report(rel, n, start);
}

/// Defect 5 of issue 14: whitespace between elements cost the reader 8
/// bytes per newline (900 MB of newlines inside `<modify>` took 7.9 GB).
/// Now it is skipped beneath the parser and only counted: what the reader
/// keeps stays at its initial size, and positions after it are still right.
#[test]
fn whitespace_between_elements_costs_no_memory_and_keeps_positions() {
    let lines = 2_000_000;
    let mut text = String::from("<osmChange version=\"0.6\">\n<modify>");
    text.push_str(&"\n".repeat(lines));
    text.push_str("  \t\r\n  <node id=\"1\" version=\"2\" lat=\"1\" lon=\"2\"/>");
    text.push_str(&" \n".repeat(lines));
    text.push_str("<node id=\"x\" version=\"1\" lat=\"1\" lon=\"2\"/></modify></osmChange>");
    let mut input = super::xml::XmlInput::new(
        "ws.osc",
        text.as_bytes(),
        None,
        u64::MAX,
        super::ElementLimits::default(),
    );
    let mut events = 0;
    let mut max_kept = 0;
    while !input
        .next_with(|_, ev| Ok(matches!(ev, super::xml::Ev::Eof)))
        .unwrap()
    {
        events += 1;
        max_kept = max_kept.max(input.kept_bytes());
    }
    assert_eq!(events, 6, "osmChange, modify, two nodes and two end tags");
    assert!(max_kept < 1 << 20, "the reader kept {max_kept} bytes");
    // Through read_osc: the bad id is named at its line (the declaration
    // line, the two runs of newlines and the one before the first node).
    let e = osc_err(&text);
    let line = 3 + 2 * lines;
    assert!(
        e.contains(&format!("line {line}, column 1:")),
        "{e} (expected line {line})"
    );
}

#[test]
fn syntax_errors_after_skipped_whitespace_name_the_right_place() {
    let mut text = String::from("<osmChange>\n<modify>");
    text.push_str(&"\n".repeat(1000));
    text.push_str("   <node id=\"1\" version=\"1\" lat=\"1\" lon=\"2\"></way>");
    let e = osc_err(&text);
    assert!(e.contains("line 1002"), "{e}");
}

#[test]
fn an_endless_tag_is_refused_at_the_event_cap() {
    // 20 MiB of whitespace inside one start tag (and, separately, one 20 MiB
    // attribute value): the parser buffers an event whole, so it is capped
    // (at 4 MiB).
    for filler in [
        " ".repeat(20 << 20),
        format!("v=\"{}\"", "x".repeat(20 << 20)),
    ] {
        let text = format!(
            "<osmChange><create>\n<node id=\"1\" version=\"1\" {filler} lat=\"1\" lon=\"2\"/></create></osmChange>"
        );
        let e = osc_err(&text);
        assert!(
            e.contains(
                "line 2, column 1: one XML tag, comment or text exceeds osmvec's limit of 4194304"
            ),
            "{e}"
        );
    }
    // A 2 MB value is within the cap.
    let text = format!(
        "<osmChange><create><node id=\"1\" version=\"1\" lat=\"1\" lon=\"2\"><tag k=\"note\" v=\"{}\"/></node></create></osmChange>",
        "y".repeat(2 << 20)
    );
    let changes = osc_str(&text).unwrap();
    assert_eq!(changes[0].element.tags()[0].1.len(), 2 << 20);
}

#[test]
fn caps_on_tags_nodes_members_and_changes_are_clear_errors() {
    let opts = OscOptions {
        max_changes: 2,
        limits: super::ElementLimits {
            max_tags: 3,
            max_way_nodes: 4,
            max_members: 2,
            max_element_bytes: 300,
            ..Default::default()
        },
        ..OscOptions::default()
    };
    let read = |body: &str| {
        let text = format!("<osmChange><create>\n{body}\n</create></osmChange>");
        read_osc("caps.osc", text.as_bytes(), false, &opts, &mut |_| Ok(()))
            .unwrap_err()
            .to_string()
    };
    let tags: String = (0..4)
        .map(|i| format!("<tag k=\"k{i}\" v=\"v\"/>"))
        .collect();
    let e = read(&format!(
        "<node id=\"7\" version=\"1\" lat=\"1\" lon=\"1\">{tags}</node>"
    ));
    assert!(
        e.starts_with("caps.osc, line 2, column ")
            && e.contains("the tag count of node 7 exceeds osmvec's limit of 3 (tags per element"),
        "{e}"
    );
    let nds: String = (0..5).map(|i| format!("<nd ref=\"{i}\"/>")).collect();
    let e = read(&format!("<way id=\"8\" version=\"1\">{nds}</way>"));
    assert!(
        e.contains("the node count of way 8 exceeds osmvec's limit of 4"),
        "{e}"
    );
    let members: String = (0..3)
        .map(|i| format!("<member type=\"node\" ref=\"{i}\" role=\"\"/>"))
        .collect();
    let e = read(&format!(
        "<relation id=\"9\" version=\"1\">{members}</relation>"
    ));
    assert!(
        e.contains("the member count of relation 9 exceeds osmvec's limit of 2"),
        "{e}"
    );
    let big: String = (0..3)
        .map(|i| format!("<tag k=\"k{i}\" v=\"{}\"/>", "z".repeat(150)))
        .collect();
    let e = read(&format!(
        "<node id=\"10\" version=\"1\" lat=\"1\" lon=\"1\">{big}</node>"
    ));
    assert!(
        e.contains("the size of node 10 exceeds osmvec's limit of 300"),
        "{e}"
    );
    let nodes: String = (1..=3)
        .map(|i| format!("<node id=\"{i}\" version=\"1\" lat=\"1\" lon=\"1\"/>"))
        .collect();
    let e = read(&nodes);
    assert!(
        e.contains("change 3 (node 3) exceeds osmvec's limit of 2 (changes per diff"),
        "{e}"
    );
}
