// The task an OpenAI API request is for: the "model" field of its JSON body. nginx's own variables
// cannot see a request body, so the router's hash key for /v1/completions and /v1/chat/completions
// comes from here (njs, nginx's JavaScript module).
//
// nginx evaluates it when it picks the upstream, which is after it has read the whole body (the proxy
// module reads the body first, with proxy_request_buffering on). r.requestText is undefined when the body
// did not fit in client_body_buffer_size and went to a temporary file: then "" (no affinity, still served).

function model(r) {
    var body = r.requestText;
    if (!body) {
        return '';
    }
    try {
        var parsed = JSON.parse(body);
        return (parsed && typeof parsed.model === 'string') ? parsed.model : '';
    } catch (e) {
        return '';  // not JSON: the server answers 400 whichever replica gets it
    }
}

export default {model};
