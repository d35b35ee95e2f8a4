#!/usr/bin/env bash
# Guest smoke test of UblkDevice::update_size (UBLK_U_CMD_UPDATE_SIZE) on a
# live device served by daemon/examples/serve_volume, without the control
# plane. On a kernel whose ublk driver has UBLK_F_UPDATE_SIZE (6.16+, e.g.
# VM_KERNEL=7.3) the device's capacity follows each `size` command (grow,
# then back) and data written before still reads back; on one without it
# (6.12) the command is refused with the kernel named and the size stays.
# Build first: cargo build --release --examples.
set -euo pipefail
fail() {
    echo "smoke-resize: FAIL: $*"
    exit 1
}
ex=$REPO/target/release/examples/serve_volume
mkdir -p "$SCRATCH/rs0" && cd "$SCRATCH"
small=$((64 << 20)) big=$((128 << 20))
coproc SRV { "$ex" "$small" "$SCRATCH/rs0" 2>"$SCRATCH/rs.log"; }
read -r dev <&"${SRV[0]}"
[[ $(blockdev --getsize64 "$dev") -eq $small ]] || fail "$dev is $(blockdev --getsize64 "$dev") bytes, not $small"
dd if=/dev/urandom of="$SCRATCH/rs.data" bs=1M count=4 status=none
dd if="$SCRATCH/rs.data" of="$dev" bs=1M oflag=direct status=none
size_cmd() { # size_cmd BYTES: prints the server's answer
    echo "size $1" >&"${SRV[1]}"
    local answer
    read -r answer <&"${SRV[0]}"
    echo "$answer"
}
release=$(uname -r)
IFS=.- read -r major minor _ <<<"$release"
if ((major > 6 || (major == 6 && minor >= 16))); then
    [[ $(size_cmd "$big") == "size ok" ]] || fail "grow to $big refused"
    [[ $(blockdev --getsize64 "$dev") -eq $big ]] || fail "$dev is $(blockdev --getsize64 "$dev") bytes after growing to $big"
    [[ $(size_cmd "$small") == "size ok" ]] || fail "resize back to $small refused"
    [[ $(blockdev --getsize64 "$dev") -eq $small ]] || fail "$dev is $(blockdev --getsize64 "$dev") bytes after resizing back"
    answer=$(size_cmd 1000)
    [[ $answer == "size error:"* ]] || fail "an unaligned size was taken: $answer"
    echo "smoke-resize: ok: $release: $dev resized live $small -> $big -> $small bytes; unaligned size refused ($answer)"
else
    answer=$(size_cmd "$big")
    [[ $answer == "size error: online resize needs Linux 6.16 or newer (this kernel: $release)" ]] ||
        fail "unexpected answer on $release: $answer"
    [[ $(blockdev --getsize64 "$dev") -eq $small ]] || fail "$dev changed size after the refusal"
    echo "smoke-resize: ok: $release: resize refused ($answer), size unchanged"
fi
# (no process substitution: the guest's devtmpfs has no /dev/fd)
dd if="$dev" of="$SCRATCH/rs.back" bs=1M count=4 iflag=direct status=none
cmp "$SCRATCH/rs.back" "$SCRATCH/rs.data" || fail "data differs after the resize"
echo stop >&"${SRV[1]}"
wait "$SRV_PID" || fail "serve_volume exited non-zero: $(tail -n 3 "$SCRATCH/rs.log")"
rm -rf "$SCRATCH/rs0" "$SCRATCH/rs.data" "$SCRATCH/rs.back"
echo "smoke-resize: all ok"
