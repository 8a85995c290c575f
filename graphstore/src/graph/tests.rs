use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use geo::Geometry;

use super::geometry::{Resolved, way_geometry};
use super::*;
use crate::element::{Meta, Node, Way};
use crate::feature::{point_feature, way_feature};

/// Turns off the outline shortcut in `spatial_edges`, so that every
/// candidate pair goes through DE-9IM: the reference the shortcut must
/// agree with. Process-wide (graphs are assembled on rayon's threads); a
/// test running meanwhile only gets its graphs the slow, exact way.
pub(super) static NO_SHORTCUT: Switch = Switch(std::sync::atomic::AtomicBool::new(false));

pub(super) struct Switch(std::sync::atomic::AtomicBool);

impl Switch {
    pub fn set(&self, on: bool) {
        self.0.store(on, std::sync::atomic::Ordering::SeqCst);
    }
    pub fn get(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

// ---------------------------------------------------------------- Delaunay

fn set(v: &[(usize, usize)]) -> BTreeSet<(usize, usize)> {
    v.iter().copied().collect()
}

#[test]
fn delaunay_square_with_centre() {
    let pts = [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.5, 0.5]];
    let e = delaunay_edges(&pts);
    assert_eq!(
        set(&e),
        set(&[
            (0, 1),
            (1, 2),
            (2, 3),
            (0, 3),
            (0, 4),
            (1, 4),
            (2, 4),
            (3, 4)
        ])
    );
    assert_eq!(e.len(), 8, "no repeats: {e:?}");
}

#[test]
fn delaunay_cocircular_square_is_deterministic() {
    // Four co-circular corners: two valid triangulations; either diagonal is
    // fine, but the same one every time.
    let pts = [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]];
    let e = delaunay_edges(&pts);
    assert_eq!(e.len(), 5, "{e:?}");
    for side in [(0, 1), (1, 2), (2, 3), (0, 3)] {
        assert!(e.contains(&side), "{e:?}");
    }
    assert!(e.contains(&(0, 2)) ^ e.contains(&(1, 3)));
    for _ in 0..5 {
        assert_eq!(delaunay_edges(&pts), e);
    }
}

#[test]
fn delaunay_degenerate_inputs() {
    assert!(delaunay_edges(&[]).is_empty());
    assert!(delaunay_edges(&[[0.3, 0.4]]).is_empty());
    assert_eq!(delaunay_edges(&[[0.3, 0.4], [0.5, 0.1]]), vec![(0, 1)]);
    // Collinear, in scrambled order: only consecutive points along the line.
    assert_eq!(
        delaunay_edges(&[[2.0, 2.0], [0.0, 0.0], [1.0, 1.0]]),
        vec![(0, 2), (1, 2)]
    );
    let line: Vec<[f64; 2]> = (0..10).map(|i| [0.1 * i as f64, 0.5]).collect();
    assert_eq!(
        delaunay_edges(&line),
        (0..9).map(|i| (i, i + 1)).collect::<Vec<_>>()
    );
    // Non-finite positions are left out.
    assert_eq!(
        delaunay_edges(&[[0.0, 0.0], [f64::NAN, 1.0], [1.0, 0.0]]),
        vec![(0, 2)]
    );
}

#[test]
fn delaunay_duplicates() {
    // 0 and 2 coincide: they are near each other and both near every point
    // adjacent to their position.
    let pts = [[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 1.0]];
    assert_eq!(
        delaunay_edges(&pts),
        vec![(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    );
    // All at one spot: a clique, no triangulation needed.
    assert_eq!(
        delaunay_edges(&[[0.5, 0.5]; 3]),
        vec![(0, 1), (0, 2), (1, 2)]
    );
    // Two distinct positions, one doubled.
    assert_eq!(
        delaunay_edges(&[[0.5, 0.5], [0.7, 0.5], [0.5, 0.5]]),
        vec![(0, 1), (0, 2), (1, 2)]
    );
}

#[test]
fn sample_key_is_fixed() {
    // The sample must be the same on every machine and build: pin the hash.
    assert_eq!(sample_key(ElementType::Node, 1), 0xe9fd_6049_d65a_f21e);
    assert_ne!(
        sample_key(ElementType::Node, 7),
        sample_key(ElementType::Way, 7)
    );
}

// --------------------------------------------------- synthetic edge rules

const LON0: f64 = 7.40;
const LAT0: f64 = 43.70;

/// Lon/lat of a point on a 1e-4° grid around (LON0, LAT0).
fn at(x: f64, y: f64) -> [f64; 2] {
    [LON0 + x * 1e-4, LAT0 + y * 1e-4]
}

fn tags(kv: &[(&str, &str)]) -> Tags {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

struct Scene {
    nodes: Vec<Resolved>,
    /// Node locations by id, for ways.
    locs: HashMap<i64, [f64; 2]>,
}

impl Scene {
    fn new() -> Self {
        Scene {
            nodes: Vec::new(),
            locs: HashMap::new(),
        }
    }
    fn loc(&mut self, id: i64, x: f64, y: f64) -> i64 {
        self.locs.insert(id, at(x, y));
        id
    }
    fn point(&mut self, id: i64, x: f64, y: f64, kv: &[(&str, &str)]) {
        let [lon, lat] = at(x, y);
        self.locs.insert(id, [lon, lat]);
        let node = Node {
            id,
            meta: Meta::default(),
            lat: (lat * 1e7).round() as i32,
            lon: (lon * 1e7).round() as i32,
            tags: tags(kv),
        };
        let f = point_feature(&node, &TileConfig::default()).unwrap();
        self.nodes.push(Resolved {
            element: ElementType::Node,
            id,
            geometry: Some(Geometry::Point(geo::Point::new(
                node.lon_deg(),
                node.lat_deg(),
            ))),
            feature: f,
            tags: node.tags,
            refs: Vec::new(),
        });
    }
    fn way(&mut self, id: i64, refs: &[i64], kv: &[(&str, &str)]) {
        let w = Way {
            id,
            meta: Meta::default(),
            refs: refs.to_vec(),
            tags: tags(kv),
        };
        let coords: Vec<[f64; 2]> = refs.iter().map(|r| self.locs[r]).collect();
        let f = way_feature(&w, &coords, &TileConfig::default()).unwrap();
        self.nodes.push(Resolved {
            element: ElementType::Way,
            id,
            geometry: way_geometry(f.kind, &coords),
            feature: f,
            tags: w.tags,
            refs: w.refs,
        });
    }
    /// A closed rectangle way from (x0, y0) to (x1, y1); node ids from `n0`.
    fn rect(&mut self, id: i64, n0: i64, [x0, y0, x1, y1]: [f64; 4], kv: &[(&str, &str)]) {
        let r = [
            self.loc(n0, x0, y0),
            self.loc(n0 + 1, x1, y0),
            self.loc(n0 + 2, x1, y1),
            self.loc(n0 + 3, x0, y1),
        ];
        self.way(id, &[r[0], r[1], r[2], r[3], r[0]], kv);
    }
    /// A multipolygon relation: rectangle `outer` with rectangle `hole`.
    fn multipolygon(&mut self, id: i64, outer: [f64; 4], hole: [f64; 4], kv: &[(&str, &str)]) {
        let ring = |[x0, y0, x1, y1]: [f64; 4]| {
            geo::LineString::from(vec![
                at(x0, y0),
                at(x1, y0),
                at(x1, y1),
                at(x0, y1),
                at(x0, y0),
            ])
        };
        // The feature record as the outer ring's; the geometry with its hole.
        let n0 = 1_000_000 + id * 10;
        self.rect(-id, n0, outer, kv);
        let mut r = self.nodes.pop().unwrap();
        r.element = ElementType::Relation;
        r.id = id;
        r.refs.clear();
        r.geometry = Some(Geometry::MultiPolygon(geo::MultiPolygon::new(vec![
            geo::Polygon::new(ring(outer), vec![ring(hole)]),
        ])));
        self.nodes.push(r);
    }
    fn build(mut self) -> TileGraph {
        self.nodes
            .sort_by_key(|r| (r.feature.kind, r.element, r.id));
        let n = self.nodes.len();
        let tile = TileId::containing(15, LON0, LAT0);
        assemble(tile, self.nodes, n, &GraphConfig::default())
    }
}

/// Edges as (kind, source id, target id) with ids `n1`/`w1`.
fn edge_names(g: &TileGraph) -> BTreeSet<(EdgeKind, String, String)> {
    let name = |i: NodeIndex| format!("{}{}", g.graph[i].element.letter(), g.graph[i].id);
    g.graph
        .raw_edges()
        .iter()
        .map(|e| (e.weight, name(e.source()), name(e.target())))
        .collect()
}

#[test]
fn edge_rules_on_a_synthetic_scene() {
    let mut s = Scene::new();
    // A park 10×10 (w1), a footway inside it (w2), a building inside it (w3),
    // a road across it (w4) carrying traffic signals (n102), a road joining
    // it at a shared node (w5), a bridge over the road without a junction
    // (w6), two buildings sharing a wall (w7, w8), grass overlapping the park
    // (w9).
    s.rect(1, 10, [0.0, 0.0, 10.0, 10.0], &[("leisure", "park")]);
    let (a, b) = (s.loc(20, 2.0, 2.0), s.loc(21, 4.0, 3.0));
    s.way(2, &[a, b], &[("highway", "footway")]);
    s.rect(3, 30, [6.0, 6.0, 8.0, 8.0], &[("building", "yes")]);
    let (r0, r1) = (s.loc(100, -5.0, 5.0), s.loc(101, 15.0, 5.0));
    s.point(102, 5.0, 5.0, &[("highway", "traffic_signals")]);
    s.way(4, &[r0, 102, r1], &[("highway", "primary")]);
    let r2 = s.loc(103, 15.0, 15.0);
    s.way(5, &[r1, r2], &[("highway", "residential")]);
    let (b0, b1) = (s.loc(110, 12.0, 0.0), s.loc(111, 12.0, 10.0));
    s.way(6, &[b0, b1], &[("highway", "footway"), ("bridge", "yes")]);
    s.rect(7, 40, [20.0, 0.0, 22.0, 2.0], &[("building", "house")]);
    // Shares the wall x = 22 by location (own node ids).
    s.rect(8, 50, [22.0, 0.0, 24.0, 2.0], &[("building", "house")]);
    s.rect(9, 60, [8.0, -2.0, 11.0, 2.0], &[("landuse", "grass")]);
    s.point(200, 7.0, 7.0, &[("shop", "bakery")]);
    s.point(201, 30.0, 0.0, &[("amenity", "bench")]);

    let g = s.build();
    assert_eq!(
        g.node_counts(),
        NodeCounts {
            point: 3,
            polyline: 4,
            polygon: 5
        }
    );
    let got = edge_names(&g);
    let mut want = BTreeSet::new();
    let mut sym = |k: EdgeKind, a: &str, b: &str| {
        want.insert((k, a.to_string(), b.to_string()));
        want.insert((k, b.to_string(), a.to_string()));
    };
    sym(EdgeKind::Near, "n102", "n200");
    sym(EdgeKind::Near, "n102", "n201");
    sym(EdgeKind::Near, "n200", "n201");
    sym(EdgeKind::Connects, "w4", "w5");
    sym(EdgeKind::Connects, "n102", "w4");
    sym(EdgeKind::Crosses, "w4", "w1");
    sym(EdgeKind::Crosses, "w6", "w4");
    sym(EdgeKind::Touches, "w7", "w8");
    sym(EdgeKind::Overlaps, "w1", "w9");
    for (a, b) in [
        ("w2", "w1"),
        ("w3", "w1"),
        ("n200", "w3"),
        ("n200", "w1"),
        ("n102", "w1"),
    ] {
        want.insert((EdgeKind::Within, a.to_string(), b.to_string()));
    }
    let missing: Vec<_> = want.difference(&got).collect();
    let extra: Vec<_> = got.difference(&want).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}\nextra {extra:?}"
    );
    let c = g.edge_counts();
    assert_eq!((c.near, c.within, c.connects), (6, 5, 4));
    assert_eq!(c.total(), g.graph.edge_count());

    // Typed relations index within each kind's range.
    let rel = g.relation_edges();
    let within_pp = &rel[&(FeatureKind::Point, EdgeKind::Within, FeatureKind::Polygon)];
    assert_eq!(within_pp.len(), 3);
    let polys = g.kind_range(FeatureKind::Polygon);
    for [s, t] in within_pp {
        assert!((*s as usize) < g.node_counts().point);
        assert!((*t as usize) < polys.len());
        let t = NodeIndex::new(polys.start + *t as usize);
        assert_eq!(g.graph[t].kind, FeatureKind::Polygon);
    }

    // Geometry vectors.
    let park = &g.graph[g.find(ElementType::Way, 1).unwrap()];
    let road = &g.graph[g.find(ElementType::Way, 4).unwrap()];
    let signals = &g.graph[g.find(ElementType::Node, 102).unwrap()];
    // 0.001° × 0.001° at 43.7° N: 111 m × 80 m.
    assert!(
        (9.0..9.2).contains(&park.geom[geom::LOG_AREA]),
        "{:?}",
        park.geom
    );
    assert_eq!(road.geom[geom::LOG_AREA], 0.0);
    // An east-west road: 2θ = 0.
    assert!((road.geom[geom::COS_2THETA] - 1.0).abs() < 1e-4);
    assert!(road.geom[geom::SIN_2THETA].abs() < 1e-3);
    assert_eq!(signals.geom[geom::SIN_2THETA], 0.0);
    assert_eq!(signals.geom[geom::COS_2THETA], 0.0);
    assert_eq!(signals.geom[geom::LOG_VERTICES], 0.0);
    assert!((road.geom[geom::LOG_VERTICES] - 3f32.ln()).abs() < 1e-6);
    // Centroids normalised to the tile.
    let t = g.tile.bounds();
    let expect_x = ((LON0 + 5e-4) - t[0]) / (t[2] - t[0]);
    assert!((signals.geom[geom::X] as f64 - expect_x).abs() < 1e-4);
    assert!(signals.geom[geom::Y] > 0.0 && signals.geom[geom::Y] < 1.0);
}

#[test]
fn edge_rules_with_holes() {
    let mut s = Scene::new();
    // A forest with a clearing (r1); a hut in the clearing (w10), a hut in
    // the forest (w11), a farmyard around the clearing (w12), a picnic site
    // in the clearing (n300) and a hunting stand in the forest (n301).
    s.multipolygon(
        1,
        [0.0, 0.0, 10.0, 10.0],
        [3.0, 3.0, 7.0, 7.0],
        &[("landuse", "forest")],
    );
    s.rect(10, 100, [4.0, 4.0, 6.0, 6.0], &[("building", "hut")]);
    s.rect(11, 110, [0.5, 0.5, 1.5, 1.5], &[("building", "hut")]);
    s.rect(12, 120, [2.0, 2.0, 8.0, 8.0], &[("landuse", "farmyard")]);
    s.point(300, 5.0, 6.5, &[("leisure", "picnic_table")]);
    s.point(301, 1.5, 8.0, &[("amenity", "hunting_stand")]);
    let g = s.build();
    let got = edge_names(&g);
    let mut want = BTreeSet::new();
    for (k, a, b) in [
        (EdgeKind::Near, "n300", "n301"),
        (EdgeKind::Near, "n301", "n300"),
        (EdgeKind::Within, "w11", "r1"),
        (EdgeKind::Within, "n301", "r1"),
        (EdgeKind::Within, "w10", "w12"),
        (EdgeKind::Within, "n300", "w12"),
        (EdgeKind::Overlaps, "w12", "r1"),
        (EdgeKind::Overlaps, "r1", "w12"),
    ] {
        want.insert((k, a.to_string(), b.to_string()));
    }
    assert_eq!(got, want);
    // DE-9IM alone agrees.
    let mut s2 = Scene::new();
    s2.multipolygon(
        1,
        [0.0, 0.0, 10.0, 10.0],
        [3.0, 3.0, 7.0, 7.0],
        &[("landuse", "forest")],
    );
    s2.rect(10, 100, [4.0, 4.0, 6.0, 6.0], &[("building", "hut")]);
    s2.rect(11, 110, [0.5, 0.5, 1.5, 1.5], &[("building", "hut")]);
    s2.rect(12, 120, [2.0, 2.0, 8.0, 8.0], &[("landuse", "farmyard")]);
    s2.point(300, 5.0, 6.5, &[("leisure", "picnic_table")]);
    s2.point(301, 1.5, 8.0, &[("amenity", "hunting_stand")]);
    NO_SHORTCUT.set(true);
    let slow = s2.build();
    NO_SHORTCUT.set(false);
    assert_eq!(edge_names(&slow), want);
}

// ------------------------------------------------------------ Monaco store

fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/data")
        .join(rel)
}

/// Monaco 2015 imported into a temporary store.
fn monaco() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    crate::import::import(
        &path,
        &[data("extracts/monaco-2015-04-27.osm.pbf")],
        TileConfig::default(),
        &|_| {},
    )
    .unwrap();
    let store = Store::open(&path).unwrap();
    (dir, store)
}

/// The fine tile with the most features (ties: the first in key order).
fn busiest_fine_tile(store: &Store) -> (TileId, usize) {
    let fine = store.tile_config().fine_zoom;
    let mut best = None;
    for (t, n) in store.tiles().unwrap() {
        if t.z == fine && best.is_none_or(|(_, m)| n > m) {
            best = Some((t, n));
        }
    }
    let (t, n) = best.expect("Monaco has tiles");
    (t, n as usize)
}

fn unlimited() -> GraphConfig {
    GraphConfig {
        max_nodes: usize::MAX,
        coarse_max_nodes: usize::MAX,
        ..GraphConfig::default()
    }
}

fn tag<'a>(n: &'a GraphNode, key: &str) -> Option<&'a str> {
    n.tags
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Ray casting, independent of `geo`.
fn ring_contains(ring: &[[f64; 2]], p: [f64; 2]) -> bool {
    let mut inside = false;
    let n = ring.len();
    for i in 0..n {
        let (a, b) = (ring[i], ring[(i + 1) % n]);
        if (a[1] > p[1]) != (b[1] > p[1]) {
            let x = a[0] + (p[1] - a[1]) / (b[1] - a[1]) * (b[0] - a[0]);
            if p[0] < x {
                inside = !inside;
            }
        }
    }
    inside
}

#[test]
fn monaco_tile_graph() {
    let (_dir, store) = monaco();
    let (tile, indexed) = busiest_fine_tile(&store);

    // Node counts by kind equal the store's feature index for the tile.
    let keys = store.features_in_tile(tile).unwrap();
    assert_eq!(keys.len(), indexed);
    let mut want = NodeCounts::default();
    for &(t, id) in &keys {
        match store.get_feature(t, id).unwrap().unwrap().kind {
            FeatureKind::Point => want.point += 1,
            FeatureKind::Polyline => want.polyline += 1,
            FeatureKind::Polygon => want.polygon += 1,
        }
    }
    let g = build_tile_graph(&store, tile, &unlimited()).unwrap();
    eprintln!(
        "busiest tile {tile}: {indexed} features, nodes {:?}, edges {:?}",
        g.node_counts(),
        g.edge_counts()
    );
    assert_eq!(g.node_counts(), want);
    assert_eq!(g.sampled_from, indexed);
    assert!(!g.is_sampled());
    assert!(want.point > 10 && want.polyline > 10 && want.polygon > 10);

    // Nodes carry their object's tags, are sorted by kind and have sane
    // geometry vectors; points lie in the tile.
    let mut prev = None;
    for n in g.graph.node_weights() {
        let k = (n.kind, n.element, n.id);
        assert!(prev < Some(k));
        prev = Some(k);
        let tags = match n.element {
            ElementType::Node => store.get_node(n.id).unwrap().unwrap().tags,
            ElementType::Way => store.get_way(n.id).unwrap().unwrap().tags,
            ElementType::Relation => store.get_relation(n.id).unwrap().unwrap().tags,
        };
        assert_eq!(n.tags, tags);
        assert!(n.geom.iter().all(|v| v.is_finite()), "{n:?}");
        if n.kind == FeatureKind::Point {
            assert!((0.0..=1.0).contains(&n.geom[geom::X]), "{n:?}");
            assert!((0.0..=1.0).contains(&n.geom[geom::Y]), "{n:?}");
        }
    }

    // Edge sanity: near only between points, within towards polygons, every
    // symmetric edge has its reverse.
    let pairs: HashSet<(usize, usize, EdgeKind)> = g
        .graph
        .raw_edges()
        .iter()
        .map(|e| (e.source().index(), e.target().index(), e.weight))
        .collect();
    for &(a, b, k) in &pairs {
        let (ka, kb) = (
            g.graph[NodeIndex::new(a)].kind,
            g.graph[NodeIndex::new(b)].kind,
        );
        assert_ne!(a, b);
        match k {
            EdgeKind::Near => assert!(ka == FeatureKind::Point && kb == FeatureKind::Point),
            EdgeKind::Within => assert_eq!(kb, FeatureKind::Polygon),
            _ => {}
        }
        if k.is_symmetric() {
            assert!(pairs.contains(&(b, a, k)), "{k:?} {a} {b} has no reverse");
        }
    }
    let c = g.edge_counts();
    assert!(c.near >= 2 * (want.point - 1), "{c:?}");
    assert!(c.connects > 0 && c.within > 0 && c.touches > 0, "{c:?}");

    // connects: every polyline–polyline connects edge joins ways sharing a
    // node (checked on the ways' refs), and a pair of highways found from
    // the refs alone has its edge.
    let refs_of = |i: NodeIndex| -> HashSet<i64> {
        let n = &g.graph[i];
        store
            .get_way(n.id)
            .unwrap()
            .unwrap()
            .refs
            .into_iter()
            .collect()
    };
    for e in g.graph.raw_edges() {
        let (s, t) = (e.source(), e.target());
        if e.weight == EdgeKind::Connects
            && g.graph[s].kind == FeatureKind::Polyline
            && g.graph[t].kind == FeatureKind::Polyline
        {
            assert!(!refs_of(s).is_disjoint(&refs_of(t)));
        }
    }
    let highways: Vec<NodeIndex> = g
        .graph
        .node_indices()
        .filter(|&i| {
            g.graph[i].kind == FeatureKind::Polyline
                && g.graph[i].element == ElementType::Way
                && tag(&g.graph[i], "highway").is_some()
        })
        .collect();
    let mut ways_at: HashMap<i64, Vec<NodeIndex>> = HashMap::new();
    for &h in &highways {
        for r in refs_of(h) {
            ways_at.entry(r).or_default().push(h);
        }
    }
    let (node, shared) = ways_at
        .iter()
        .filter(|(_, ws)| ws.len() >= 2)
        .min_by_key(|(n, _)| **n)
        .expect("two highways share a node in the busiest tile");
    let (a, b) = (shared[0], shared[1]);
    eprintln!(
        "highways w{} and w{} share node n{node}",
        g.graph[a].id, g.graph[b].id
    );
    let has = |s: NodeIndex, t: NodeIndex, k: EdgeKind| {
        g.graph.edges_connecting(s, t).any(|e| *e.weight() == k)
    };
    assert!(has(a, b, EdgeKind::Connects) && has(b, a, EdgeKind::Connects));
    assert!(!has(a, b, EdgeKind::Crosses) && !has(a, b, EdgeKind::Touches));

    // within: tagged nodes inside building / landuse ways, found by ray
    // casting on node locations read straight from the store.
    let mut found = 0;
    for pi in g.graph.node_indices() {
        let p = &g.graph[pi];
        if p.kind != FeatureKind::Polygon || p.element != ElementType::Way {
            continue;
        }
        if tag(p, "building").is_none() && tag(p, "landuse").is_none() {
            continue;
        }
        let way = store.get_way(p.id).unwrap().unwrap();
        let ring: Vec<[f64; 2]> = way
            .refs
            .iter()
            .map(|r| {
                let n = store.get_node(*r).unwrap().unwrap();
                [n.lon_deg(), n.lat_deg()]
            })
            .collect();
        for qi in g.kind_range(FeatureKind::Point).map(NodeIndex::new) {
            let q = &g.graph[qi];
            if way.refs.contains(&q.id) {
                continue; // on the outline (an entrance): not within
            }
            let n = store.get_node(q.id).unwrap().unwrap();
            let inside = ring_contains(&ring, [n.lon_deg(), n.lat_deg()]);
            assert_eq!(
                inside,
                has(qi, pi, EdgeKind::Within),
                "n{} in w{} ({:?})",
                q.id,
                p.id,
                p.tags
            );
            if inside {
                found += 1;
                if found == 1 {
                    eprintln!("n{} {:?} is within w{} {:?}", q.id, q.tags, p.id, p.tags);
                }
            }
        }
    }
    assert!(found > 0, "no POI inside a building or landuse way");

    // The same tile again gives the same graph.
    let again = build_tile_graph(&store, tile, &unlimited()).unwrap();
    assert_eq!(edge_names(&again), edge_names(&g));

    // The batch builder, with one feature cache for every tile of both
    // zooms, gives exactly the graphs built tile by tile.
    let all: Vec<TileId> = store.tiles().unwrap().into_keys().collect();
    let mut cache = FeatureCache::default();
    for chunk in all.chunks(37) {
        let batch = build_tile_graphs(&store, chunk, &unlimited(), &mut cache).unwrap();
        for (t, g) in chunk.iter().zip(&batch) {
            let one = build_tile_graph(&store, *t, &unlimited()).unwrap();
            assert_eq!(edge_names(g), edge_names(&one), "tile {t}");
            assert_eq!(g.fingerprint(), one.fingerprint(), "tile {t}");
            assert_eq!(g.sampled_from, one.sampled_from);
        }
    }
    assert!(!cache.is_empty());
    // A small cache is emptied between batches, never within one.
    let mut small = FeatureCache {
        max_features: 50,
        ..FeatureCache::default()
    };
    let batch = build_tile_graphs(&store, &all[..20], &unlimited(), &mut small).unwrap();
    for (t, g) in all[..20].iter().zip(&batch) {
        assert_eq!(
            g.fingerprint(),
            build_tile_graph(&store, *t, &unlimited())
                .unwrap()
                .fingerprint()
        );
    }

    // The outline-based decisions agree with DE-9IM (`relate` on every
    // pair, `geo`'s point in polygon) on every tile, both zooms.
    for (t, _) in store.tiles().unwrap() {
        let fast = build_tile_graph(&store, t, &unlimited()).unwrap();
        NO_SHORTCUT.set(true);
        let slow = build_tile_graph(&store, t, &unlimited()).unwrap();
        NO_SHORTCUT.set(false);
        assert_eq!(edge_names(&fast), edge_names(&slow), "tile {t}");
    }
}

#[test]
fn monaco_sampling_and_context() {
    let (_dir, store) = monaco();
    let (tile, indexed) = busiest_fine_tile(&store);
    let cap = 50;
    assert!(indexed > cap);
    let cfg = GraphConfig {
        max_nodes: cap,
        coarse_max_nodes: 80,
        ..GraphConfig::default()
    };
    let ids = |g: &TileGraph| -> Vec<(ElementType, i64)> {
        g.graph.node_weights().map(|n| (n.element, n.id)).collect()
    };
    let g1 = build_tile_graph(&store, tile, &cfg).unwrap();
    let g2 = build_tile_graph(&store, tile, &cfg).unwrap();
    assert_eq!(g1.graph.node_count(), cap);
    assert_eq!(g1.sampled_from, indexed);
    assert!(g1.is_sampled());
    assert_eq!(ids(&g1), ids(&g2));
    assert_eq!(edge_names(&g1), edge_names(&g2));
    // The kept features are the ones with the smallest sample keys.
    let mut keys = store.features_in_tile(tile).unwrap();
    keys.sort_by_key(|&(t, id)| sample_key(t, id));
    let want: BTreeSet<_> = keys[..cap].iter().copied().collect();
    assert_eq!(ids(&g1).into_iter().collect::<BTreeSet<_>>(), want);
    // A larger cap keeps a superset (stable under growth).
    let g3 = build_tile_graph(
        &store,
        tile,
        &GraphConfig {
            max_nodes: cap + 10,
            ..cfg
        },
    )
    .unwrap();
    let big: BTreeSet<_> = ids(&g3).into_iter().collect();
    assert!(want.is_subset(&big));

    // near over every kind: a connected triangulation of all nodes.
    let all = build_tile_graph(
        &store,
        tile,
        &GraphConfig {
            near_all_kinds: true,
            ..cfg
        },
    )
    .unwrap();
    let near_kinds: BTreeSet<(FeatureKind, FeatureKind)> = all
        .relation_edges()
        .keys()
        .filter(|r| r.1 == EdgeKind::Near)
        .map(|r| (r.0, r.2))
        .collect();
    assert_eq!(near_kinds.len(), 9, "{near_kinds:?}");
    let near_only =
        petgraph::visit::EdgeFiltered::from_fn(&all.graph, |e| *e.weight() == EdgeKind::Near);
    assert_eq!(petgraph::algo::connected_components(&near_only), 1);

    // Coarse context graph: the parent tile, with its own cap.
    let ctx = build_context_graph(&store, tile, &cfg).unwrap();
    let coarse = coarse_parent(tile, store.tile_config().coarse_zoom);
    assert_eq!(ctx.tile, coarse);
    assert_eq!(coarse, tile.parent_at(12));
    let coarse_n = store.features_in_tile(coarse).unwrap().len();
    assert_eq!(ctx.sampled_from, coarse_n);
    assert_eq!(ctx.graph.node_count(), coarse_n.min(80));

    // An empty tile is an empty graph; an unindexed zoom is an error.
    let empty = build_tile_graph(&store, TileId { z: 15, x: 0, y: 0 }, &cfg).unwrap();
    assert!(empty.is_empty() && empty.sampled_from == 0);
    assert!(build_tile_graph(&store, tile.parent_at(14), &cfg).is_err());
}

/// CPU time (user + system) of the calling thread in ms, from
/// /proc/thread-self/stat (Linux; 10 ms ticks, so only meaningful over many
/// builds). Unlike wall time it does not count waiting for a busy CPU.
fn thread_cpu_ms() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    let mut f = stat.rsplit_once(')')?.1.split_whitespace();
    // Fields 14 and 15 of the line; the split starts at field 3.
    let utime: f64 = f.nth(11)?.parse().ok()?;
    let stime: f64 = f.next()?.parse().ok()?;
    Some((utime + stime) * 10.0) // USER_HZ is 100 on Linux
}

/// Builds every tile of the store and prints timings: the best of three
/// builds per tile, since test machines are shared and busy.
#[test]
fn monaco_timing() {
    let (_dir, store) = monaco();
    let cfg = GraphConfig::default();
    let fine = store.tile_config().fine_zoom;
    let tiles: Vec<(TileId, u64)> = store.tiles().unwrap().into_iter().collect();
    let best_of_3 = |t: TileId| -> (f64, TileGraph) {
        let mut best = f64::INFINITY;
        let mut graph = None;
        for _ in 0..3 {
            let start = Instant::now();
            let g = build_tile_graph(&store, t, &cfg).unwrap();
            best = best.min(start.elapsed().as_secs_f64() * 1e3);
            graph = Some(g);
        }
        (best, graph.unwrap())
    };
    let mut times = Vec::new();
    let (mut nodes, mut edges) = (0, 0);
    for &(t, n) in tiles.iter().filter(|(t, _)| t.z == fine) {
        let (ms, g) = best_of_3(t);
        nodes += g.graph.node_count();
        edges += g.graph.edge_count();
        times.push((ms, t, n, g.graph.node_count(), g.graph.edge_count()));
    }
    times.sort_by(|a, b| a.0.total_cmp(&b.0));
    let q = |f: f64| times[((times.len() - 1) as f64 * f).round() as usize].0;
    let mean = times.iter().map(|t| t.0).sum::<f64>() / times.len() as f64;
    eprintln!(
        "{} fine tiles, {nodes} nodes, {edges} edges; per tile: mean {mean:.2} ms, p50 {:.2}, p90 {:.2}, max {:.2} ms",
        times.len(),
        q(0.5),
        q(0.9),
        q(1.0)
    );
    for (ms, t, n, nn, ne) in times.iter().rev().take(5) {
        eprintln!("  {t}: {ms:.2} ms, {n} features, {nn} nodes, {ne} edges");
    }
    // CPU per build, over many builds of the busiest tiles.
    for &(_, t, n, nn, _) in times.iter().rev().take(3) {
        let rounds = 30;
        if let Some(c0) = thread_cpu_ms() {
            for _ in 0..rounds {
                build_tile_graph(&store, t, &cfg).unwrap();
            }
            let cpu = (thread_cpu_ms().unwrap() - c0) / rounds as f64;
            eprintln!("  {t}: CPU {cpu:.2} ms per build ({n} features, {nn} nodes)");
        }
    }
    for &(t, n) in tiles.iter().filter(|(t, _)| t.z != fine) {
        let (ms, g) = best_of_3(t);
        eprintln!(
            "coarse {t}: {ms:.2} ms, {n} features, {} nodes, {} edges",
            g.graph.node_count(),
            g.graph.edge_count()
        );
    }
}

/// The fingerprint sees tags, geometry and edges, and nothing else.
#[test]
fn fingerprint_follows_what_an_encoder_reads() {
    let (_dir, store) = monaco();
    let (tile, _) = busiest_fine_tile(&store);
    let g = build_tile_graph(&store, tile, &GraphConfig::default()).unwrap();
    let fp = g.fingerprint();
    assert_eq!(
        fp,
        build_tile_graph(&store, tile, &GraphConfig::default())
            .unwrap()
            .fingerprint()
    );
    let mut tagged = g.clone();
    let n = tagged.graph.node_indices().next().unwrap();
    tagged.graph[n].tags.push(("note".into(), "x".into()));
    assert_ne!(tagged.fingerprint(), fp);
    let mut moved = g.clone();
    moved.graph[n].geom[0] += 1e-6;
    assert_ne!(moved.fingerprint(), fp);
    let mut fewer = g.clone();
    let e = fewer.graph.edge_indices().next().unwrap();
    fewer.graph.remove_edge(e);
    assert_ne!(fewer.fingerprint(), fp);
    let mut sampled = g.clone();
    sampled.sampled_from += 1;
    assert_eq!(
        sampled.fingerprint(),
        fp,
        "the pre-sampling count is not read by encoders"
    );
}
