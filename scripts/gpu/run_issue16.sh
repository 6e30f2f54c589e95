#!/usr/bin/env bash
# On the GPU device, after the staging calls (scripts/gpu/README.md): issue 16's production-size runs,
# the two ways of building slot images side by side in one call (each call stays under 10 minutes).
#   bash scripts/gpu/run_issue16.sh stall     # bench.sync_stall: slot builders, then ready slot images (~8 min)
#   bash scripts/gpu/run_issue16.sh many      # bench.sync_stall: 32 tenants of rank 16 syncing every 4 s (~6 min)
#   bash scripts/gpu/run_issue16.sh final     # every sync_stall window with ready images, two rounds (~8 min)
#   bash scripts/gpu/run_issue16.sh publish   # bench.publish_latency (colocated trainer): peft files, then the
#                                             # GPU copy into the server (publish_images, the default) (~8 min)
#   bash scripts/gpu/run_issue16.sh latency   # bench.publish_latency by GPU copy alone, in place, armed flips on and off (~6 min)
#   bash scripts/gpu/run_issue16.sh image     # bench.image_publish: peft files against ready slot images (~4 min)
#   bash scripts/gpu/run_issue16.sh colocated-8b  # the colocated trainer against a standalone one at 8B (~4 min)
#   bash scripts/gpu/run_issue16.sh restart   # the colocated trainer follows its server across a crash (~3 min)
# Results accumulate in /tmp/i16 while the machine stays warm; each call returns all of them, with
# py-spy profiles of the all-tenant windows, in one tarball under $OUT.
set -uo pipefail
bash scripts/gpu/device_install.sh || exit 1
export PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled \
  PYTHONUNBUFFERED=1 TINKER_TELEMETRY=0 PATH=/tmp/site/bin:$PATH
res=/tmp/i16; out=${OUT:-/tmp/out}; mkdir -p "$res" "$out"
rc=0
case "${1:-stall}" in
  stall)  # versions as peft files laid out by 4 slot builders, then as ready slot images (the trainer's way)
    for way in builders images; do
      flags="--stage-threads 4 --slot-builders"; [ "$way" = images ] && flags="--stage-threads 4 --sources images"
      timeout 280 python3 -m bench.sync_stall --shape 8b --num-gpus 1 --rank 32 --tenants 8 --streams 12 \
        --window-s 10 --rounds 1 --windows nosync one all all-inplace --profile-windows all-inplace \
        --machine h200 --label "$way" --out "$res/stall-$way" $flags > "$res/stall-$way.log" 2>&1 || rc=$?
      grep "bench.sync_stall wrote" "$res/stall-$way.log" | cut -c1-600
    done ;;
  final)  # issue 16's side-by-side run (versions as the trainer publishes them, every window, a
          # profile of 8 tenants syncing in place); save -> first token is `latency`, a call of its own
    # two rounds of interleaved windows: each ratio the median of two, where one 10 s window's p99 rests
    # on ~8 gaps (four runs of one round on 2026-12-02 moved the no-sync p99 24-30 ms)
    timeout 480 python3 -m bench.sync_stall --shape 8b --num-gpus 1 --rank 32 --tenants 8 --streams 12 \
      --window-s 10 --rounds 2 --windows nosync one one-inplace legacy all all-inplace engine-wide --stage-threads 4 \
      --sources images --profile-windows all-inplace --machine h200 --label final --out "$res/stall-final" \
      > "$res/stall-final.log" 2>&1 || rc=$?
    grep "bench.sync_stall wrote" "$res/stall-final.log" | cut -c1-800 ;;
  many)  # 32 tenants of rank 16, each syncing once every 4 s, ready slot images
    timeout 420 python3 -m bench.sync_stall --shape 8b --num-gpus 1 --rank 16 --tenants 32 --streams 3 \
      --window-s 12 --rounds 1 --all-period 4 --windows nosync one all all-inplace engine-wide \
      --stage-threads 4 --sources images --machine h200 --label many --out "$res/stall-many" \
      > "$res/stall-many.log" 2>&1 || rc=$?
    grep "bench.sync_stall wrote" "$res/stall-many.log" | cut -c1-600 ;;
  latency)  # save -> first token by GPU copy alone (the colocated trainer's default), in place (issue 17's
            # armed flip), every window of bench.publish_latency with armed flips and without (~6 min)
    timeout 480 python3 -m bench.publish_latency --num-gpus 1 --tenants 4 --streams 8 --publishes 8 \
      --sync-mode inplace --machine h200 --out "$res/publish-latency" --publish-images --profile-exports 2 \
      > "$res/publish-latency.log" 2>&1 || rc=$?
    # the actors' errors (the trainer's fallbacks, the worker's failed flips) come back with the results
    grep -rh -B2 -A30 "Traceback\|GPU copy failed\|armed flip" /tmp/ray/session_latest/logs/ 2>/dev/null \
      | head -400 > "$res/actor-errors.log"
    grep "bench.publish_latency wrote" "$res/publish-latency.log" | cut -c1-800 ;;
  publish)
    for way in files gpu-copy; do
      flags="--publish-images"; [ "$way" = files ] && flags="--no-publish-images"
      timeout 280 python3 -m bench.publish_latency --num-gpus 1 --tenants 4 --streams 8 --publishes 8 \
        --machine h200 --out "$res/publish-$way" $flags > "$res/publish-$way.log" 2>&1 || rc=$?
      grep "bench.publish_latency wrote" "$res/publish-$way.log" | cut -c1-600
    done ;;
  colocated-8b)  # issue 17's forward/backward equality at 8B shape (tests_cuda/test_shared_base_8b.py, ~4 min)
    timeout 540 python3 -m pytest tests_cuda/test_shared_base_8b.py -p no:cacheprovider -x -q -rA -s \
      --junitxml="$res/colocated-8b-junit.xml" > "$res/colocated-8b.log" 2>&1 || rc=$?
    grep "8b:" "$res/colocated-8b.log"; tail -5 "$res/colocated-8b.log" ;;
  restart)  # a colocated trainer follows its server across a crash (tests_cuda/test_shared_base_restart.py), and
            # what a mapping does when the process that exported it dies (torch alone)
    timeout 120 python3 scripts/gpu/ipc_exporter_exit.py --out "$res" > "$res/ipc-exporter-exit.log" 2>&1 || rc=$?
    timeout 420 python3 -m pytest tests_cuda/test_shared_base_restart.py -p no:cacheprovider -x -q -rA -s \
      --junitxml="$res/restart-junit.xml" > "$res/restart.log" 2>&1 || rc=$?
    tail -3 "$res/ipc-exporter-exit.log"; grep "restart:" "$res/restart.log"; tail -5 "$res/restart.log" ;;
  image)
    timeout 400 python3 -m bench.image_publish --shape 8b --rank 32 --num-gpus 1 --rounds 8 --machine h200 \
      --out "$res/image" > "$res/image.log" 2>&1 || rc=$?
    grep "bench.image_publish wrote" "$res/image.log" | cut -c1-800 ;;
  *) echo "usage: $0 stall|final|many|latency|publish|image|colocated-8b|restart"; exit 2 ;;
esac
tar czf "$out/issue16-$(date +%H%M%S).tgz" -C "$res" .
exit $rc
