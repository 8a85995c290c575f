//! `near` edges: the Delaunay triangulation over point positions (GeoLink
//! links its point features the same way), computed with `spade`.

use spade::{DelaunayTriangulation, HasPosition, Point2, Triangulation};

/// A triangulation vertex that remembers which position group it stands for.
struct Vertex {
    pos: Point2<f64>,
    group: usize,
}

impl HasPosition for Vertex {
    type Scalar = f64;
    fn position(&self) -> Point2<f64> {
        self.pos
    }
}

/// Undirected Delaunay edges over `pts`, as index pairs `(i, j)` with
/// `i < j`, sorted and without repeats.
///
/// Two points are *near* when their positions are adjacent in the Delaunay
/// triangulation of the distinct positions, or when they share a position:
///
/// - coincident points (several features at exactly one spot) are linked to
///   each other, and each of them to every point at an adjacent position, so
///   no feature is left out or favoured by the order it came in;
/// - fewer than two distinct positions give no edge between positions;
///   exactly two give one;
/// - collinear positions (no triangle at all) give the edges between
///   consecutive positions along the line;
/// - non-finite positions are skipped.
///
/// The result does not depend on the order of `pts` beyond the indices it
/// names, except for the tie-break among co-circular positions (four corners
/// of a square), where spade's choice of diagonal follows its bulk-load order,
/// itself a deterministic function of the input.
pub fn delaunay_edges(pts: &[[f64; 2]]) -> Vec<(usize, usize)> {
    // Group coincident positions: sort indices by position, then by index.
    let mut order: Vec<usize> = (0..pts.len())
        .filter(|&i| pts[i][0].is_finite() && pts[i][1].is_finite())
        .collect();
    order.sort_by(|&a, &b| {
        pts[a][0]
            .total_cmp(&pts[b][0])
            .then(pts[a][1].total_cmp(&pts[b][1]))
            .then(a.cmp(&b))
    });
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for i in order {
        match groups.last_mut() {
            Some(g) if pts[g[0]] == pts[i] => g.push(i),
            _ => groups.push(vec![i]),
        }
    }

    let mut edges = Vec::new();
    for g in &groups {
        for (k, &a) in g.iter().enumerate() {
            for &b in &g[k + 1..] {
                edges.push((a.min(b), a.max(b)));
            }
        }
    }
    let link = |edges: &mut Vec<(usize, usize)>, ga: usize, gb: usize| {
        for &a in &groups[ga] {
            for &b in &groups[gb] {
                edges.push((a.min(b), a.max(b)));
            }
        }
    };

    if groups.len() >= 2 {
        // Positions relative to the first (smallest) one: spade refuses
        // magnitudes below ~1e-292 other than zero, which the offsets of OSM
        // coordinates (1e-7° resolution) never come near.
        let origin = pts[groups[0][0]];
        let verts: Vec<Vertex> = groups
            .iter()
            .enumerate()
            .map(|(g, members)| {
                let p = pts[members[0]];
                Vertex {
                    pos: Point2::new(p[0] - origin[0], p[1] - origin[1]),
                    group: g,
                }
            })
            .collect();
        match DelaunayTriangulation::<Vertex>::bulk_load(verts) {
            Ok(t) => {
                for e in t.undirected_edges() {
                    let [a, b] = e.vertices();
                    link(&mut edges, a.data().group, b.data().group);
                }
            }
            Err(err) => {
                // Only reachable with coordinates spade cannot represent;
                // fall back to a chain along the sorted positions.
                tracing::warn!("Delaunay triangulation failed ({err:?}); chaining points instead");
                for g in 1..groups.len() {
                    link(&mut edges, g - 1, g);
                }
            }
        }
    }
    edges.sort_unstable();
    edges.dedup();
    edges
}
