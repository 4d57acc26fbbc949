# Sourced by v4/sitting.sh and v4/after_teacher.sh, from the repository root: where the run, the
# stand-in features and the data are (each may be set beforehand), and the pre-registered code that
# every driver of this study is pinned to (docs/preregistration_reverie.md, "Teacher v4").
O=${O:-/work/runs/reverie-v4}
V=${V:-/work/feats/rev/views.hdf5}
J=${J:-/work/feats/rev/objects.hdf5}
D=${D:-$(cd ../shared/data && pwd)}
PIN=54d3ba89b1d3
