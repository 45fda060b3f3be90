# Log in, start a run, follow it, resume after its end. A user of createsuperuser:
# LOGIN=admin PASSWORD=... sh docs/snippets/first-run.sh
set -eu
BASE=${BASE:-http://127.0.0.1:8000}
jar=$(mktemp)
csrftoken() { awk '$6 == "csrftoken" { print $7 }' "$jar"; }

# A session login, as a browser's: the login page sets the csrftoken cookie, the
# form sends it back. (The admin's login page here; any login view will do.)
# Do not follow the login's redirect (no -L): without a "next" field it leads to
# LOGIN_REDIRECT_URL, /accounts/profile/, which a project may not have (404).
# A client that follows redirects posts next=/admin/ too.
curl -sf -c "$jar" -o /dev/null "$BASE/admin/login/"
curl -sf -b "$jar" -c "$jar" -o /dev/null -H "Origin: $BASE" "$BASE/admin/login/" \
    --data-urlencode "username=$LOGIN" --data-urlencode "password=$PASSWORD" \
    --data-urlencode "csrfmiddlewaretoken=$(csrftoken)"
# Start a run in the session "chat-1", with the csrftoken as the login left it.
curl -sf -b "$jar" -H "Origin: $BASE" -H "X-CSRFToken: $(csrftoken)" -w "\n" \
    -H "Content-Type: application/json" -d '{"prompt": "Hello there"}' "$BASE/runs/chat-1/"
# Follow it: what it said so far, then live, until the done event.
curl -sfN -b "$jar" "$BASE/runs/chat-1/events/" | tee "$jar.events"
# Reconnect with the last id you got: the rest of the run, or 204 after its end.
last=$(sed -n 's/^id: //p' "$jar.events" | tail -n 1)
curl -s -o /dev/null -w "%{http_code}\n" -b "$jar" -H "Last-Event-ID: $last" \
    "$BASE/runs/chat-1/events/"
rm -f "$jar" "$jar.events"
