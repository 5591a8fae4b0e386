<?php
// One request, sent the way Blazz (the Laravel application) sends it to a whatsapp-service
// instance, through Guzzle; prints one JSON line describing the answer.
//
// Usage: php blazz_client.php '<json spec>'. The spec (built by tests/test_php_client.py):
//   autoload     Guzzle's autoload.php
//   client       "service": App\Services\WhatsApp\WhatsAppServiceClient's own Guzzle client
//                "http":    Laravel's Http facade (Illuminate\Http\Client\PendingRequest)
//   base_uri     where the application points (here: the proxy)
//   method, path the call
//   payload      the array the Blazz method builds (body or query, as that client places it)
//   headers      extra headers that caller adds (e.g. X-API-Key), or {}
//   hmac_secret  services.whatsapp.hmac_secret, or null (then no signature headers)
//   timeout      seconds
//
// Everything variable arrives as JSON, so nothing is ever spliced into PHP source.
//
// What each client does, as read in Blazz (described, not copied):
// - "service": a Client built with base_uri, timeout (services.whatsapp.timeout), connect_timeout
//   10 and default headers Content-Type: application/json, Accept: application/json,
//   User-Agent: Laravel-WhatsApp-Service/1.0. Each request adds X-Timestamp (Unix seconds) and
//   X-Signature = HMAC-SHA256 of that timestamp string alone (not the body, not the path) when a
//   secret is configured. POST/PUT/PATCH send the payload as JSON; GET appends it to the path
//   with http_build_query; DELETE sends neither. Guzzle's http_errors stays on, so a 4xx/5xx is
//   an exception whose response the client then reads.
// - "http": no base_uri (the caller concatenates the URL), Content-Type: application/json,
//   connect_timeout 10, http_errors off; GET sends the payload as the query, every other method
//   as a JSON body (an empty payload sends no body).

$spec = json_decode($argv[1], true, 512, JSON_THROW_ON_ERROR);
require $spec['autoload'];

use GuzzleHttp\Client;
use GuzzleHttp\Exception\BadResponseException;
use GuzzleHttp\Exception\ConnectException;

$method = strtoupper($spec['method']);
$payload = $spec['payload'] ?? [];
$extra = $spec['headers'] ?? [];
$out = ['exception' => null, 'exception_message' => null, 'sent_headers' => []];

if ($spec['client'] === 'service') {
    $client = new Client([
        'base_uri' => $spec['base_uri'],
        'timeout' => $spec['timeout'],
        'connect_timeout' => 10,
        'headers' => [
            'Content-Type' => 'application/json',
            'Accept' => 'application/json',
            'User-Agent' => 'Laravel-WhatsApp-Service/1.0',
        ],
    ]);
    $headers = $extra;
    if (!empty($spec['hmac_secret'])) {
        $timestamp = time();
        $headers['X-Timestamp'] = $timestamp;
        $headers['X-Signature'] = hash_hmac('sha256', (string) $timestamp, $spec['hmac_secret']);
    }
    $options = ['headers' => $headers];
    $target = $spec['path'];
    if (in_array($method, ['POST', 'PUT', 'PATCH'], true) && !empty($payload)) {
        $options['json'] = $payload;
    }
    if ($method === 'GET' && !empty($payload)) {
        $target .= '?' . http_build_query($payload);
    }
} elseif ($spec['client'] === 'http') {
    $client = new Client([
        'timeout' => $spec['timeout'],
        'connect_timeout' => 10,
        'http_errors' => false,
    ]);
    $headers = ['Content-Type' => 'application/json'] + $extra;
    $options = ['headers' => $headers];
    $target = rtrim($spec['base_uri'], '/') . $spec['path'];
    if ($method === 'GET') {
        if (!empty($payload)) {
            $options['query'] = $payload;
        }
    } elseif (!empty($payload)) {
        $options['json'] = $payload;
    }
} else {
    fwrite(STDERR, "unknown client {$spec['client']}\n");
    exit(2);
}
$out['sent_headers'] = array_map('strval', $headers);

$response = null;
try {
    $response = $client->request($method, $target, $options);
} catch (BadResponseException $e) {
    // What WhatsAppServiceClient::makeRequest catches and turns into success => false.
    $response = $e->getResponse();
    $out['exception'] = get_class($e);
} catch (ConnectException $e) {
    $out['exception'] = get_class($e);
    $out['exception_message'] = $e->getMessage();
}

if ($response === null) {
    $out['status'] = null;
} else {
    $raw = (string) $response->getBody();
    $header = function (string $name) use ($response): ?string {
        return $response->hasHeader($name) ? $response->getHeaderLine($name) : null;
    };
    $out += [
        'status' => $response->getStatusCode(),
        'content_type' => $response->getHeaderLine('Content-Type'),
        'body' => json_decode($raw, true),
        'raw' => $raw,
        'instance' => $header('X-Proxy-Instance'),
        'attempts' => $header('X-Proxy-Attempts'),
        'proxy_error' => $header('X-Proxy-Error'),
        'request_id' => $header('X-Request-Id'),
    ];
}
echo json_encode($out, JSON_UNESCAPED_SLASHES), "\n";
