#!/usr/bin/env bash
# The test broker: Apache Kafka 4.4, one KRaft node (broker and controller in one JVM), from
# Maven Central (scripts/java/kafka-pom.xml, resolved into $LAKESINK_CACHE/kafka-4.4.0).
#
#   scripts/kafka.sh install        # resolve the jars (once; idempotent)
#   scripts/kafka.sh start DIR      # TLS certificates, users, ACLs, free ports; writes DIR/env
#   scripts/kafka.sh kill DIR       # SIGKILL the broker (the chaos harness's broker crash)
#   scripts/kafka.sh restart DIR    # start again on the same data directory and ports
#   scripts/kafka.sh stop DIR
#   scripts/kafka.sh transactions DIR ARGS...  # Kafka's kafka-transactions tool (KIP-664): list,
#                                   # describe-producers, find-hanging, abort
#
# Listeners, all on 127.0.0.1:
#   PLAINTEXT  the tests' default; its principal (ANONYMOUS) is a super user
#   SASL_SSL   TLS with a certificate from a test CA (DIR/ca.pem), SASL PLAIN users as on
#              Confluent Cloud and Event Hubs and SCRAM-SHA-512 users as on MSK; ACLs enforced:
#              cc-key/cc-secret (PLAIN) and msk-user/msk-secret (SCRAM-SHA-512) may use topics,
#              groups and transactional ids starting with "sasl-", except that cc-key may not
#              read topics starting with "sasl-denied-" (describe only) nor create topics
#              starting with "sasl-nocreate-"; noacl/noacl-secret
#              (PLAIN) may log in and nothing else; OAUTHBEARER with OIDC as on Confluent
#              Cloud OAuth and Event Hubs with Entra ID: tokens from scripts/oidc_idp.py
#              (client lakesink-oidc/oidc-secret, at $LAKESINK_TEST_OIDC/token), validated by
#              the broker against its JWKS; lakesink-oidc has cc-key's "sasl-" ACLs
#   CONTROLLER the KRaft quorum
# Transactions work on one node (transaction.state.log.replication.factor=1, min.isr=1).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${LAKESINK_CACHE:-$HOME/.cache/lakesink}
VERSION=4.4.0
LIBS=$CACHE/kafka-$VERSION/libs
# The Python of the test venv (scripts/services.sh creates it first): the OIDC provider signs
# with `cryptography`.
PYTHON=${LAKESINK_PYTHON:-$CACHE/venv/bin/python}
CMD=${1:?usage: kafka.sh install|start|kill|restart|stop [DIR]}
DIR=${2:-}

log() { printf '== %s\n' "$*" >&2; }

install() {
  local stamp
  stamp=$(sha256sum "$ROOT/scripts/java/kafka-pom.xml" | cut -c1-16)
  if [ -f "$LIBS/.complete" ] && [ "$(cat "$LIBS/.complete")" = "$stamp" ]; then return 0; fi
  if ! command -v java >/dev/null 2>&1 || ! command -v mvn >/dev/null 2>&1; then
    log "installing Java 17 and Maven (Debian packages)"
    apt-get install -y -qq openjdk-17-jre-headless maven >/dev/null 2>&1 ||
      { apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless maven >/dev/null; }
  fi
  log "resolving Apache Kafka $VERSION from Maven Central into $LIBS"
  rm -rf "$LIBS"
  mkdir -p "$LIBS"
  mvn -q -B -f "$ROOT/scripts/java/kafka-pom.xml" dependency:copy-dependencies \
    -DoutputDirectory="$LIBS" -DincludeScope=runtime >&2
  echo "$stamp" >"$LIBS/.complete"
}

java_run() { # main-class args...
  java -Xms64m -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Xshare:auto \
    -Dlog4j2.configurationFile="$DIR/log4j2.yaml" -cp "$LIBS/*" "$@"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

launch() {
  local from
  from=1
  if [ -f "$DIR/kafka.log" ]; then from=$(($(wc -l <"$DIR/kafka.log") + 1)); fi
  # The broker's own JVM: a larger heap than the tools, G1, and its output in DIR/kafka.log.
  # Kafka 4 fetches OAuth URLs (the JWKS the broker validates OIDC tokens with) only when listed.
  local idp
  idp=$(sed -n 's/^OIDC_PORT=//p' "$DIR/ports")
  nohup java -Xms256m -Xmx1g -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -Dorg.apache.kafka.sasl.oauthbearer.allowed.urls="http://127.0.0.1:$idp/jwks" \
    -Dlog4j2.configurationFile="$DIR/log4j2.yaml" -cp "$LIBS/*" kafka.Kafka "$DIR/server.properties" \
    >>"$DIR/kafka.log" 2>&1 &
  echo $! >"$DIR/pid"
  # Ready when the log says so (the port opens a little earlier) and the plaintext port answers.
  local port
  port=$(sed -n 's/^PLAINTEXT_PORT=//p' "$DIR/ports")
  for _ in $(seq 1 1200); do
    if ! kill -0 "$(cat "$DIR/pid")" 2>/dev/null; then
      echo "Kafka exited during start-up; its log:" >&2; tail -50 "$DIR/kafka.log" >&2; exit 1
    fi
    if tail -n "+$from" "$DIR/kafka.log" 2>/dev/null | grep -q "Kafka Server started" &&
      (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  echo "Kafka did not start within 120 s; its log:" >&2; tail -50 "$DIR/kafka.log" >&2; exit 1
}

stop_idp() {
  if [ -f "$DIR/idp.pid" ]; then kill "$(cat "$DIR/idp.pid")" 2>/dev/null || true; rm -f "$DIR/idp.pid"; fi
}

stop_broker() { # signal
  if [ -f "$DIR/pid" ]; then
    local pid
    pid=$(cat "$DIR/pid")
    kill "-$1" "$pid" 2>/dev/null || true
    for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$DIR/pid"
  fi
}

start() {
  install
  mkdir -p "$DIR"
  DIR=$(cd "$DIR" && pwd)
  local plain sasl ctrl idp
  plain=$(free_port); sasl=$(free_port); ctrl=$(free_port); idp=$(free_port)
  printf 'PLAINTEXT_PORT=%s\nSASL_SSL_PORT=%s\nCONTROLLER_PORT=%s\nOIDC_PORT=%s\n' \
    "$plain" "$sasl" "$ctrl" "$idp" >"$DIR/ports"

  # The OIDC identity provider (scripts/oidc_idp.py): client credentials in, RS256 JWTs out,
  # and the JWKS the broker validates them with. Up before the broker, which reads the JWKS.
  stop_idp
  if [ ! -x "$PYTHON" ]; then
    echo "kafka.sh: no Python at $PYTHON for the OIDC provider: run scripts/services.sh start" \
      "(it creates the test venv) or set LAKESINK_PYTHON" >&2
    exit 1
  fi
  nohup "$PYTHON" "$ROOT/scripts/oidc_idp.py" "$idp" '{"lakesink-oidc": "oidc-secret"}' \
    >"$DIR/idp.log" 2>&1 &
  echo $! >"$DIR/idp.pid"
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$idp") 2>/dev/null; then break; fi
    sleep 0.1
  done
  if ! (exec 3<>"/dev/tcp/127.0.0.1/$idp") 2>/dev/null; then
    echo "kafka.sh: the OIDC provider did not start on port $idp; its log:" >&2
    cat "$DIR/idp.log" >&2
    exit 1
  fi

  # A test CA and a broker certificate for localhost / 127.0.0.1, as PEM (key in PKCS#8).
  openssl req -x509 -newkey rsa:2048 -nodes -keyout "$DIR/ca.key" -out "$DIR/ca.pem" -days 30 \
    -subj "/CN=lakesink test CA" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -keyout "$DIR/server.key" -out "$DIR/server.csr" \
    -subj "/CN=localhost" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$DIR/san.ext"
  openssl x509 -req -in "$DIR/server.csr" -CA "$DIR/ca.pem" -CAkey "$DIR/ca.key" -CAcreateserial \
    -out "$DIR/server.crt" -days 30 -extfile "$DIR/san.ext" 2>/dev/null
  openssl pkcs8 -topk8 -nocrypt -in "$DIR/server.key" -out "$DIR/server.p8"
  cat "$DIR/server.crt" "$DIR/server.p8" >"$DIR/keystore.pem"

  cp "$ROOT/scripts/java/log4j2.yaml" "$DIR/log4j2.yaml"

  cat >"$DIR/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$ctrl
listeners=PLAINTEXT://127.0.0.1:$plain,SASL_SSL://127.0.0.1:$sasl,CONTROLLER://127.0.0.1:$ctrl
advertised.listeners=PLAINTEXT://127.0.0.1:$plain,SASL_SSL://127.0.0.1:$sasl
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT
sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-512,OAUTHBEARER
listener.name.sasl_ssl.oauthbearer.sasl.jaas.config=org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule required ;
listener.name.sasl_ssl.oauthbearer.sasl.server.callback.handler.class=org.apache.kafka.common.security.oauthbearer.OAuthBearerValidatorCallbackHandler
sasl.oauthbearer.jwks.endpoint.url=http://127.0.0.1:$idp/jwks
sasl.oauthbearer.expected.audience=kafka
sasl.oauthbearer.expected.issuer=http://127.0.0.1:$idp
listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_cc-key="cc-secret" user_noacl="noacl-secret";
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.ssl.keystore.type=PEM
listener.name.sasl_ssl.ssl.keystore.location=$DIR/keystore.pem
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users=User:ANONYMOUS
log.dirs=$DIR/data
num.partitions=1
auto.create.topics.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=10
group.initial.rebalance.delay.ms=0
group.consumer.session.timeout.ms=6000
group.consumer.min.session.timeout.ms=1000
group.consumer.heartbeat.interval.ms=1000
group.consumer.min.heartbeat.interval.ms=500
group.classic.min.session.timeout.ms=1000
log.flush.interval.messages=9223372036854775807
log.segment.bytes=67108864
log.retention.check.interval.ms=300000
EOF
  if [ ! -d "$DIR/data" ]; then
    # A random cluster id in Kafka's form. One in 64 base64 ids starts with '-', which the
    # format tool's argument parser takes for an option (Kafka's own Uuid.randomUuid skips those).
    local cluster_id
    cluster_id=$(python3 -c 'import uuid,base64
while True:
    s = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    if not s.startswith("-"): print(s); break')
    java_run kafka.tools.StorageTool format -t "$cluster_id" \
      -c "$DIR/server.properties" --add-scram 'SCRAM-SHA-512=[name=msk-user,password=msk-secret]' \
      >"$DIR/format.log" 2>&1 || { cat "$DIR/format.log" >&2; exit 1; }
  fi
  launch

  # ACLs for the SASL users (as the plaintext super user).
  java_run org.apache.kafka.tools.AclCommand --bootstrap-server "127.0.0.1:$plain" --add \
    --allow-principal User:cc-key --allow-principal User:msk-user \
    --allow-principal User:lakesink-oidc --operation All \
    --topic sasl- --group sasl- --transactional-id sasl- --resource-pattern-type prefixed \
    >"$DIR/acls.log" 2>&1 || { cat "$DIR/acls.log" >&2; exit 1; }
  # A topic cc-key may describe but not read: a partition that is assigned and never fetched.
  java_run org.apache.kafka.tools.AclCommand --bootstrap-server "127.0.0.1:$plain" --add \
    --deny-principal User:cc-key --operation Read --topic sasl-denied- \
    --resource-pattern-type prefixed >>"$DIR/acls.log" 2>&1 || { cat "$DIR/acls.log" >&2; exit 1; }
  # Topics cc-key may use but not create: a dead-letter topic lakesink cannot create.
  java_run org.apache.kafka.tools.AclCommand --bootstrap-server "127.0.0.1:$plain" --add \
    --deny-principal User:cc-key --operation Create --topic sasl-nocreate- \
    --resource-pattern-type prefixed >>"$DIR/acls.log" 2>&1 || { cat "$DIR/acls.log" >&2; exit 1; }

  cat >"$DIR/env" <<EOF
export LAKESINK_TEST_KAFKA=127.0.0.1:$plain
export LAKESINK_TEST_KAFKA_SASL_SSL=127.0.0.1:$sasl
export LAKESINK_TEST_KAFKA_CA=$DIR/ca.pem
export LAKESINK_TEST_KAFKA_DIR=$DIR
export LAKESINK_TEST_OIDC=http://127.0.0.1:$idp
EOF
  log "Apache Kafka $VERSION on 127.0.0.1:$plain (PLAINTEXT), 127.0.0.1:$sasl (SASL_SSL)"
}

case "$CMD" in
  install) install ;;
  start) start ;;
  kill) DIR=$(cd "${DIR:?DIR}" && pwd); stop_broker 9 ;;
  restart) DIR=$(cd "${DIR:?DIR}" && pwd); stop_broker 9; launch ;;
  stop) DIR=$(cd "${DIR:?DIR}" && pwd); stop_broker TERM; stop_idp ;;
  transactions)
    DIR=$(cd "${DIR:?DIR}" && pwd); shift 2
    java_run org.apache.kafka.tools.TransactionsCommand \
      --bootstrap-server "127.0.0.1:$(sed -n 's/^PLAINTEXT_PORT=//p' "$DIR/ports")" "$@" ;;
  *) echo "usage: kafka.sh install|start|kill|restart|stop|transactions [DIR]" >&2; exit 2 ;;
esac
