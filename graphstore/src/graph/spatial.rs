//! `within`, `touches`, `crosses` and `overlaps` edges from the real
//! geometries.
//!
//! Candidate pairs come from an R-tree over bounding boxes. The predicates
//! follow DE-9IM (as `geo`'s `relate` computes them), but `relate` builds a
//! topology graph of both whole geometries for every pair, so a pair with a
//! district boundary of thousands of vertices costs as much as the boundary
//! is long, for every small feature along it. Here every line and polygon
//! gets an [`Outline`] (its segments, with an R-tree when there are many),
//! and a pair is decided from the segments near the other feature only:
//!
//! 1. outlines that share no point: the pair is disjoint or one lies inside
//!    the other, and one vertex per ring tells which ([`apart`]);
//! 2. outlines that meet, with a polygon involved: each feature's outline is
//!    cut where it meets the other's, and each piece is located (inside,
//!    outside, or on the boundary with the interiors on the same or on
//!    opposite sides), which gives the DE-9IM entries the predicates need
//!    ([`local`]);
//! 3. two lines that meet go through `relate` (they are short).
//!
//! The tests check that this gives exactly `relate`'s edges on real tiles.

use geo::kernels::robust::RobustKernel;
use geo::line_intersection::{LineIntersection, line_intersection};
use geo::{
    BoundingRect, Contains, Coord, Geometry, Kernel, LineString, LinesIter, Orientation,
    PreparedGeometry, Relate,
};
use rstar::primitives::{GeomWithData, Rectangle};
use rstar::{AABB, Envelope, RTree};

use super::EdgeKind;
use super::geometry::Resolved;
use crate::feature::FeatureKind;

/// Adds the spatial edges of `nodes` (sorted by kind) to `edges`.
/// `connected` are the polyline pairs (sorted) that share an OSM node: they
/// get no `touches`/`crosses`.
/// Verdicts of feature pairs already decided, shared by the tiles of a
/// batch (and later batches while the store does not change): a pair's
/// predicates depend on the two features' whole geometries only, not on the
/// tile, so two features that share forty tiles are compared once. Sharded
/// so that rayon's threads seldom wait for each other.
pub(crate) struct PairMemo {
    shards: Vec<std::sync::Mutex<PairMap>>,
    len: std::sync::atomic::AtomicUsize,
}

/// `(type, id)` of the pair's first and second feature (in graph order).
type PairKey = (u8, i64, u8, i64);

/// Keyed by ids: the fast hasher (see `idhash`).
type PairMap = crate::idhash::IdMap<PairKey, Verdict>;

impl Default for PairMemo {
    fn default() -> Self {
        PairMemo {
            shards: (0..16).map(|_| Default::default()).collect(),
            len: Default::default(),
        }
    }
}

impl PairMemo {
    fn shard(&self, k: &PairKey) -> &std::sync::Mutex<PairMap> {
        let h = (k.1 as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (k.3 as u64);
        &self.shards[(h % self.shards.len() as u64) as usize]
    }

    fn get_or(&self, k: PairKey, compute: impl FnOnce() -> Option<Verdict>) -> Option<Verdict> {
        if let Some(v) = self.shard(&k).lock().expect("pair memo").get(&k) {
            return Some(*v);
        }
        let v = compute()?;
        if self
            .shard(&k)
            .lock()
            .expect("pair memo")
            .insert(k, v)
            .is_none()
        {
            self.len.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Some(v)
    }

    /// Pairs held.
    pub(crate) fn len(&self) -> usize {
        self.len.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn clear(&mut self) {
        for s in &mut self.shards {
            s.get_mut().expect("pair memo").clear();
        }
        *self.len.get_mut() = 0;
    }
}

fn key_of(a: &Resolved, b: &Resolved) -> PairKey {
    (a.element as u8, a.id, b.element as u8, b.id)
}

type Envelopes = RTree<GeomWithData<Rectangle<[f64; 2]>, usize>>;

/// An R-tree of the features' envelopes (index into `nodes` as data).
fn envelope_tree(nodes: &[&Resolved], outlines: &[Option<&Outline>]) -> Envelopes {
    let kind = |i: usize| nodes[i].feature.kind;
    let mut items = Vec::new();
    for (i, r) in nodes.iter().enumerate() {
        let outline = outlines[i];
        let envelope = match (outline, &r.geometry, kind(i)) {
            (Some(o), _, _) => Some(o.envelope),
            // A single-node line: no outline, but still a candidate.
            (None, Some(g), FeatureKind::Polyline) => g
                .bounding_rect()
                .map(|b| AABB::from_corners([b.min().x, b.min().y], [b.max().x, b.max().y])),
            _ => None,
        };
        if let Some(e) = envelope {
            items.push(GeomWithData::new(
                Rectangle::from_corners(e.lower(), e.upper()),
                i,
            ));
        }
    }
    RTree::bulk_load(items)
}

/// `within` edges of points inside polygons (a point on the outline is not
/// within).
fn points_within(
    nodes: &[&Resolved],
    outlines: &[Option<&Outline>],
    tree: &Envelopes,
    memo: &PairMemo,
    edges: &mut Vec<(usize, usize, EdgeKind)>,
) {
    let kind = |i: usize| nodes[i].feature.kind;
    let exact_only = exact_only();
    for (i, r) in nodes.iter().enumerate() {
        let (FeatureKind::Point, Some(Geometry::Point(p))) = (kind(i), &r.geometry) else {
            continue;
        };
        for c in tree.locate_in_envelope_intersecting(AABB::from_point([p.x(), p.y()])) {
            let j = c.data;
            if kind(j) != FeatureKind::Polygon {
                continue;
            }
            let v = memo.get_or(key_of(r, nodes[j]), || {
                let inside = match (outlines[j], &nodes[j].geometry) {
                    (_, Some(g)) if exact_only => guarded(|| g.contains(p)) == Some(true),
                    (Some(o), _) => o.locate(p.0) == Pos::Inside,
                    _ => false,
                };
                Some(Verdict {
                    a_within_b: inside,
                    ..Verdict::default()
                })
            });
            if v.is_some_and(|v| v.a_within_b) {
                edges.push((i, j, EdgeKind::Within));
            }
        }
    }
}

/// `outlines[i]` is [`outline_of`] `nodes[i]` (built by the caller, so that
/// a feature shared by many tiles gets one outline); `memo` keeps the
/// verdicts of pairs across tiles.
pub(super) fn spatial_edges(
    nodes: &[&Resolved],
    outlines: &[Option<&Outline>],
    connected: &[(usize, usize)],
    memo: &PairMemo,
    edges: &mut Vec<(usize, usize, EdgeKind)>,
) {
    let kind = |i: usize| nodes[i].feature.kind;
    let tree = envelope_tree(nodes, outlines);
    points_within(nodes, outlines, &tree, memo, edges);
    let exact_only = exact_only();

    // Line and polygon pairs, in index order (polylines before polygons, so
    // a's kind <= b's).
    let mut pairs: Vec<(usize, usize)> = tree
        .intersection_candidates_with_other_tree(&tree)
        .filter(|(a, b)| a.data < b.data)
        .map(|(a, b)| (a.data, b.data))
        .collect();
    pairs.sort_unstable();
    let mut prepared: Vec<Option<Option<PreparedGeometry<'_, &Geometry>>>> =
        (0..nodes.len()).map(|_| None).collect();
    for (a, b) in pairs {
        let (ka, kb) = (kind(a), kind(b));
        if ka == FeatureKind::Polyline
            && kb == FeatureKind::Polyline
            && connected.binary_search(&(a, b)).is_ok()
        {
            continue;
        }
        if nodes[a].geometry.is_none() || nodes[b].geometry.is_none() {
            continue;
        }
        let verdict = memo.get_or(key_of(nodes[a], nodes[b]), || {
            let quick = match (outlines[a], outlines[b]) {
                (Some(oa), Some(ob)) if !exact_only => decide(ka, oa, kb, ob),
                _ => None,
            };
            Some(match quick {
                Some(v) => v,
                None => {
                    let mut prepare = |i: usize| {
                        if prepared[i].is_none() {
                            let g = nodes[i].geometry.as_ref().expect("checked above");
                            prepared[i] = Some(guarded(|| PreparedGeometry::from(g)));
                        }
                    };
                    prepare(a);
                    prepare(b);
                    let (Some(Some(pa)), Some(Some(pb))) = (&prepared[a], &prepared[b]) else {
                        return None;
                    };
                    match guarded(|| pa.relate(pb)) {
                        Some(im) => Verdict::from_matrix(ka, kb, &im),
                        None => {
                            tracing::warn!(
                                "relate failed between {}{} and {}{}",
                                nodes[a].element.letter(),
                                nodes[a].id,
                                nodes[b].element.letter(),
                                nodes[b].id
                            );
                            return None;
                        }
                    }
                }
            })
        });
        if let Some(v) = verdict {
            v.push(a, b, edges);
        }
    }
}

/// Whether to skip the outline-based decisions (tests compare them with
/// DE-9IM on every pair).
#[cfg(test)]
fn exact_only() -> bool {
    super::tests::NO_SHORTCUT.get()
}

#[cfg(not(test))]
fn exact_only() -> bool {
    false
}

/// What one pair of lines/polygons contributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Verdict {
    a_within_b: bool,
    b_within_a: bool,
    /// `touches`, `crosses` or `overlaps`, only when neither is within the
    /// other.
    symmetric: Option<EdgeKind>,
}

impl Verdict {
    fn push(self, a: usize, b: usize, edges: &mut Vec<(usize, usize, EdgeKind)>) {
        if self.a_within_b {
            edges.push((a, b, EdgeKind::Within));
        }
        if self.b_within_a {
            edges.push((b, a, EdgeKind::Within));
        }
        if let Some(k) = self.symmetric {
            edges.push((a, b, k));
            edges.push((b, a, k));
        }
    }

    /// The edge rules on a DE-9IM matrix, for `a`'s kind <= `b`'s.
    fn from_matrix(ka: FeatureKind, kb: FeatureKind, im: &geo::relate::IntersectionMatrix) -> Self {
        let mut v = Verdict::default();
        match (ka, kb) {
            (FeatureKind::Polyline, FeatureKind::Polyline) => {
                if im.is_crosses() {
                    v.symmetric = Some(EdgeKind::Crosses);
                } else if im.is_touches() {
                    v.symmetric = Some(EdgeKind::Touches);
                }
            }
            (FeatureKind::Polyline, FeatureKind::Polygon) => {
                if im.is_within() {
                    v.a_within_b = true;
                } else if im.is_crosses() {
                    v.symmetric = Some(EdgeKind::Crosses);
                } else if im.is_touches() {
                    v.symmetric = Some(EdgeKind::Touches);
                }
            }
            (FeatureKind::Polygon, FeatureKind::Polygon) => {
                v.a_within_b = im.is_within();
                v.b_within_a = im.is_contains();
                if !v.a_within_b && !v.b_within_a {
                    if im.is_touches() {
                        v.symmetric = Some(EdgeKind::Touches);
                    } else if im.is_overlaps() {
                        v.symmetric = Some(EdgeKind::Overlaps);
                    }
                }
            }
            _ => {}
        }
        v
    }
}

/// Where a point lies relative to a polygon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pos {
    Inside,
    Outside,
    Boundary,
}

/// The outline a feature's spatial predicates use: lines and polygons
/// have one (unless they have no segment), points none.
pub(super) fn outline_of(r: &Resolved) -> Option<Outline> {
    match (&r.geometry, r.feature.kind) {
        (Some(g), FeatureKind::Polyline | FeatureKind::Polygon) => Outline::new(g),
        _ => None,
    }
}

/// The segments of a line or of a polygon's rings.
pub(super) struct Outline {
    envelope: AABB<[f64; 2]>,
    polygon: bool,
    segments: Vec<geo::Line>,
    /// Polygons: whether the interior lies left of each segment.
    interior_left: Vec<bool>,
    /// An R-tree over the segments' boxes, for outlines too long to scan.
    tree: Option<RTree<GeomWithData<Rectangle<[f64; 2]>, usize>>>,
    /// One vertex of each ring (polygons) or the first vertex (lines).
    probes: Vec<Coord>,
}

/// Outlines with more segments than this are searched through an R-tree.
const SCAN_MAX: usize = 32;

fn segment_box(l: &geo::Line) -> AABB<[f64; 2]> {
    AABB::from_corners([l.start.x, l.start.y], [l.end.x, l.end.y])
}

/// Twice the signed area of a ring: positive when counter-clockwise.
fn ring_area2(r: &LineString) -> f64 {
    r.lines()
        .map(|l| l.start.x * l.end.y - l.end.x * l.start.y)
        .sum()
}

fn orient(p: Coord, q: Coord, r: Coord) -> Orientation {
    <RobustKernel as Kernel<f64>>::orient2d(p, q, r)
}

impl Outline {
    /// `None` for geometries without a segment (a single-node line).
    fn new(g: &Geometry) -> Option<Outline> {
        let mut segments = Vec::new();
        let mut interior_left = Vec::new();
        let mut probes = Vec::new();
        let mut ring = |r: &LineString, exterior: bool| {
            if let Some(c) = r.0.first() {
                probes.push(*c);
            }
            let left = (ring_area2(r) > 0.0) == exterior;
            for l in r.lines_iter() {
                segments.push(l);
                interior_left.push(left);
            }
        };
        let polygon = match g {
            Geometry::LineString(l) => {
                segments.extend(l.lines_iter());
                probes.extend(l.0.first().copied());
                false
            }
            Geometry::Polygon(p) => {
                ring(p.exterior(), true);
                p.interiors().iter().for_each(|r| ring(r, false));
                true
            }
            Geometry::MultiPolygon(mp) => {
                for p in &mp.0 {
                    ring(p.exterior(), true);
                    p.interiors().iter().for_each(|r| ring(r, false));
                }
                true
            }
            _ => return None,
        };
        if segments.is_empty() {
            return None;
        }
        let rect = g.bounding_rect()?;
        let tree = (segments.len() > SCAN_MAX).then(|| {
            RTree::bulk_load(
                segments
                    .iter()
                    .enumerate()
                    .map(|(i, l)| {
                        let b = segment_box(l);
                        GeomWithData::new(Rectangle::from_corners(b.lower(), b.upper()), i)
                    })
                    .collect(),
            )
        });
        Some(Outline {
            envelope: AABB::from_corners(
                [rect.min().x, rect.min().y],
                [rect.max().x, rect.max().y],
            ),
            polygon,
            segments,
            interior_left,
            tree,
            probes,
        })
    }

    /// Calls `f` with the index of each segment whose box meets `env`, until
    /// it returns `true`; says whether one did.
    fn any_near(&self, env: AABB<[f64; 2]>, mut f: impl FnMut(usize) -> bool) -> bool {
        match &self.tree {
            Some(t) => t.locate_in_envelope_intersecting(env).any(|c| f(c.data)),
            None => self
                .segments
                .iter()
                .enumerate()
                .any(|(i, s)| segment_box(s).intersects(&env) && f(i)),
        }
    }

    /// Whether the two outlines share a point (exact: robust segment
    /// intersection).
    fn meets(&self, other: &Outline) -> bool {
        let (big, small) = if self.segments.len() >= other.segments.len() {
            (self, other)
        } else {
            (other, self)
        };
        small.segments.iter().any(|s| {
            let env = segment_box(s);
            env.intersects(&big.envelope)
                && big.any_near(env, |j| line_intersection(*s, big.segments[j]).is_some())
        })
    }

    /// Position of a point relative to this polygon (even-odd over all
    /// rings), by counting the crossings of a ray to the east, with robust
    /// orientation tests.
    fn locate(&self, p: Coord) -> Pos {
        debug_assert!(self.polygon);
        let e = self.envelope;
        if p.x < e.lower()[0] || p.x > e.upper()[0] || p.y < e.lower()[1] || p.y > e.upper()[1] {
            return Pos::Outside;
        }
        // A ray to the nearer of the east and west edges of the box.
        let east = e.upper()[0] - p.x <= p.x - e.lower()[0];
        let ray = if east {
            AABB::from_corners([p.x, p.y], [e.upper()[0], p.y])
        } else {
            AABB::from_corners([e.lower()[0], p.y], [p.x, p.y])
        };
        let mut inside = false;
        let on_boundary = self.any_near(ray, |j| {
            let (a, b) = (self.segments[j].start, self.segments[j].end);
            let straddles = (a.y > p.y) != (b.y > p.y);
            let level = a.y == p.y || b.y == p.y;
            if !straddles && !level {
                return false;
            }
            let o = orient(a, b, p);
            if o == Orientation::Collinear
                && a.x.min(b.x) <= p.x
                && p.x <= a.x.max(b.x)
                && a.y.min(b.y) <= p.y
                && p.y <= a.y.max(b.y)
            {
                return true;
            }
            // An upward edge passes east of p when p is on its left, a
            // downward one when p is on its right (and west otherwise).
            if straddles && o != Orientation::Collinear {
                let up = b.y > a.y;
                let passes_east = up == (o == Orientation::CounterClockwise);
                if passes_east == east {
                    inside = !inside;
                }
            }
            false
        });
        if on_boundary {
            Pos::Boundary
        } else if inside {
            Pos::Inside
        } else {
            Pos::Outside
        }
    }
}

/// Decides a pair from outlines, `None` when a case is left to `relate`.
fn decide(ka: FeatureKind, oa: &Outline, kb: FeatureKind, ob: &Outline) -> Option<Verdict> {
    if !oa.meets(ob) {
        return apart(ka, oa, kb, ob);
    }
    match (ka, kb) {
        (FeatureKind::Polyline, FeatureKind::Polygon)
        | (FeatureKind::Polygon, FeatureKind::Polygon) => Some(local(oa, ob)),
        _ => None,
    }
}

/// Two features whose outlines share no point: each ring (and each line)
/// lies wholly inside or wholly outside the other feature, so one vertex per
/// ring tells which. A polygon is within another when all its rings are
/// inside it and none of the other's rings is inside it (else a hole of the
/// outer one would lie in the inner one).
fn apart(ka: FeatureKind, oa: &Outline, kb: FeatureKind, ob: &Outline) -> Option<Verdict> {
    let inside = |probes: &[Coord], o: &Outline| -> usize {
        probes
            .iter()
            .filter(|p| o.locate(**p) == Pos::Inside)
            .count()
    };
    let mut v = Verdict::default();
    match (ka, kb) {
        (FeatureKind::Polyline, FeatureKind::Polyline) => {}
        (FeatureKind::Polyline, FeatureKind::Polygon) => v.a_within_b = inside(&oa.probes, ob) > 0,
        (FeatureKind::Polygon, FeatureKind::Polygon) => {
            let a_in_b = inside(&oa.probes, ob);
            let b_in_a = inside(&ob.probes, oa);
            match (a_in_b, b_in_a) {
                (0, 0) => {}
                (n, 0) if n == oa.probes.len() => v.a_within_b = true,
                (0, n) if n == ob.probes.len() => v.b_within_a = true,
                _ => return None,
            }
        }
        _ => return None,
    }
    Some(v)
}

/// How the outline of one feature lies relative to a polygon: which kinds of
/// pieces it is made of once cut where it meets the polygon's outline.
#[derive(Debug, Default, Clone, Copy)]
struct Pieces {
    inside: bool,
    outside: bool,
    /// On the polygon's outline, both interiors on the same side.
    along_same: bool,
    /// On the polygon's outline, the interiors on opposite sides (or, for a
    /// line, just on the outline).
    along_opposite: bool,
}

/// Cuts `a`'s segments where they meet polygon `b`'s outline and locates
/// each piece.
fn pieces(a: &Outline, b: &Outline) -> Pieces {
    let mut out = Pieces::default();
    // Any point of `a` outside `b`'s box is outside `b`.
    let (al, au, bl, bu) = (
        a.envelope.lower(),
        a.envelope.upper(),
        b.envelope.lower(),
        b.envelope.upper(),
    );
    if al[0] < bl[0] || al[1] < bl[1] || au[0] > bu[0] || au[1] > bu[1] {
        out.outside = true;
    }
    let mut cuts: Vec<f64> = Vec::new();
    let mut along: Vec<(f64, f64, usize)> = Vec::new();
    a.any_near(b.envelope, |i| {
        let s = a.segments[i];
        let (d, p) = (s.end - s.start, s.start);
        if d.x == 0.0 && d.y == 0.0 {
            return false;
        }
        // Position along s of a point on it (exact at the endpoints).
        let param = |c: Coord| {
            if d.x.abs() >= d.y.abs() {
                (c.x - p.x) / d.x
            } else {
                (c.y - p.y) / d.y
            }
        };
        cuts.clear();
        cuts.extend([0.0, 1.0]);
        along.clear();
        b.any_near(segment_box(&s), |j| {
            match line_intersection(s, b.segments[j]) {
                Some(LineIntersection::SinglePoint { intersection, .. }) => {
                    cuts.push(param(intersection).clamp(0.0, 1.0));
                }
                Some(LineIntersection::Collinear { intersection }) => {
                    let (t0, t1) = (param(intersection.start), param(intersection.end));
                    let (t0, t1) = (t0.min(t1).clamp(0.0, 1.0), t0.max(t1).clamp(0.0, 1.0));
                    cuts.extend([t0, t1]);
                    along.push((t0, t1, j));
                }
                None => {}
            }
            false
        });
        cuts.sort_by(f64::total_cmp);
        cuts.dedup();
        for w in cuts.windows(2) {
            let (t0, t1) = (w[0], w[1]);
            // Pieces shorter than this are rounding noise between two cuts
            // at (nearly) one point.
            if t1 - t0 <= 1e-12 {
                continue;
            }
            let tm = 0.5 * (t0 + t1);
            if let Some(&(_, _, j)) = along.iter().find(|(c0, c1, _)| *c0 <= tm && tm <= *c1) {
                if a.polygon {
                    let bj = b.segments[j];
                    let e = bj.end - bj.start;
                    let same_dir = d.x * e.x + d.y * e.y > 0.0;
                    let same_side = (a.interior_left[i] == b.interior_left[j]) == same_dir;
                    if same_side {
                        out.along_same = true;
                    } else {
                        out.along_opposite = true;
                    }
                } else {
                    out.along_opposite = true;
                }
                continue;
            }
            let m = Coord {
                x: p.x + tm * d.x,
                y: p.y + tm * d.y,
            };
            match b.locate(m) {
                Pos::Inside => out.inside = true,
                Pos::Outside => out.outside = true,
                // Only where rounding put the midpoint on the outline.
                Pos::Boundary => out.along_opposite = true,
            }
        }
        false
    });
    out
}

/// DE-9IM predicates of a line or polygon `a` and a polygon `b` whose
/// outlines meet, from the pieces of each outline relative to the other.
fn local(a: &Outline, b: &Outline) -> Verdict {
    let pa = pieces(a, b);
    let mut v = Verdict::default();
    if !a.polygon {
        // A line: interior inside (II), interior outside (IE).
        let (ii, ie) = (pa.inside, pa.outside);
        if ii && !ie {
            v.a_within_b = true;
        } else if ii && ie {
            v.symmetric = Some(EdgeKind::Crosses);
        } else if !ii {
            v.symmetric = Some(EdgeKind::Touches);
        }
        return v;
    }
    let pb = pieces(b, a);
    // The region where both interiors meet (or where one interior meets the
    // other's exterior) is bounded by pieces of either outline, so some piece
    // shows it.
    let ii = pa.inside || pb.inside || pa.along_same;
    let ie = pa.outside || pb.inside || pa.along_opposite;
    let be = pa.outside;
    let ei = pb.outside || pa.inside || pa.along_opposite;
    let eb = pb.outside;
    v.a_within_b = ii && !ie && !be;
    v.b_within_a = ii && !ei && !eb;
    if !v.a_within_b && !v.b_within_a {
        if !ii {
            v.symmetric = Some(EdgeKind::Touches);
        } else if ie && ei {
            v.symmetric = Some(EdgeKind::Overlaps);
        }
    }
    v
}

/// Runs a geometry predicate, turning a panic inside `geo` (it has had a few
/// on degenerate input) into `None` so one broken polygon cannot stop the
/// daemon.
pub(super) fn guarded<T>(f: impl FnOnce() -> T) -> Option<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).ok()
}
